"""Pure Flax linen modules; nothing here knows about meshes or files."""

from lm.models.transformer import Transformer

__all__ = ["Transformer"]
