"""lm: pretrain Transformer language models in JAX."""

__version__ = "0.1.0"


def load(workdir: str, step: int | None = None):
  """A run's checkpoint on this machine's devices, to evaluate and generate from (see lm.inference)."""
  from lm import inference  # imported on use: `import lm` stays light

  return inference.load(workdir, step)
