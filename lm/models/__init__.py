"""Pure Flax linen modules; nothing here knows about meshes or files.

`get(model_config)` builds the model a config's family names: a decoder (llama, gpt2), an encoder
(bert) or an encoder-decoder (t5). Each takes its [B, T] int32 inputs (`num_inputs` of them), has
`hidden_only` to return its final activations and `output_logits(params, x_BTD)` to turn those into
float32 logits, so a loss can compute them a few positions at a time.
"""

import ml_collections

from lm.models.encoder import Encoder
from lm.models.encoder_decoder import EncoderDecoder
from lm.models.transformer import Transformer

DECODER_FAMILIES = ("llama", "gpt2")
ENCODER_FAMILIES = ("bert",)
ENCODER_DECODER_FAMILIES = ("t5",)
FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES + ENCODER_DECODER_FAMILIES


def get(model_config, num_classes: int = 0):
  """The module of the config's model.family, with a classification head of `num_classes` classes (0: none)."""
  model_config = ml_collections.FrozenConfigDict(model_config)
  if model_config.family in ENCODER_FAMILIES:
    return Encoder(model_config, num_classes=num_classes)
  if model_config.family in ENCODER_DECODER_FAMILIES:
    return EncoderDecoder(model_config, num_classes=num_classes)
  return Transformer(model_config, num_classes=num_classes)


__all__ = ["Encoder", "EncoderDecoder", "Transformer", "get", "FAMILIES"]
