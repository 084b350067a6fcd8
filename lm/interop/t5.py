"""T5's Hugging Face table: lm's EncoderDecoder (family "t5") <-> transformers' `T5ForConditionalGeneration`.

T5 v1.1 (gated GELU, untied output layer) and tied T5 v1.1-style models; the original T5's ReLU
MLP is not lm's. Each stack's relative position bias lives in Hugging Face's first block
(block.0.layer.0.SelfAttention.relative_attention_bias), in lm on the stack itself.

Whether logits are scaled by d_model ** -0.5 goes with tying in lm (model.tie_embeddings). transformers
4 reads it from tie_word_embeddings; transformers 5 always ties lm_head to the shared embedding
unless the checkpoint holds a different lm_head.weight, and keeps the scaling apart
(scale_decoder_outputs, written into the config.json it saves, derived from tie_word_embeddings
when absent). So: the scaling decides tie_embeddings, and an unscaled model saved without
lm_head.weight has the shared embedding as its output layer.

Shape letters: D embed dim, N heads, H head dim (d_kv), F MLP width, V vocab, R relative buckets.
"""

import ml_collections
import numpy as np

from lm.config import ConfigError
from lm.interop import tables
from lm.models import layers

ATTENTION = (
    ("q.weight", ("query", "kernel")),
    ("k.weight", ("key", "kernel")),
    ("v.weight", ("value", "kernel")),
    ("o.weight", ("out", "kernel")),
)
MLP = (
    ("DenseReluDense.wi_0.weight", ("mlp", "gate", "kernel"), True),
    ("DenseReluDense.wi_1.weight", ("mlp", "up", "kernel"), True),
    ("DenseReluDense.wo.weight", ("mlp", "down", "kernel"), True),
)
SHARED = "shared.weight"
LM_HEAD = "lm_head.weight"
RELATIVE_BIAS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def _block(is_decoder: bool) -> tables.Table:
  """One block: (name under {stack}.block.{i}., path under lm's layers_{i}, torch Linear weight)."""
  block = [(f"layer.0.SelfAttention.{name}", ("attn", *path), True) for name, path in ATTENTION]
  block.append(("layer.0.layer_norm.weight", ("attn_norm", "scale"), False))
  if is_decoder:
    block += [(f"layer.1.EncDecAttention.{name}", ("cross_attn", *path), True) for name, path in ATTENTION]
    block.append(("layer.1.layer_norm.weight", ("cross_norm", "scale"), False))
  mlp = "layer.2." if is_decoder else "layer.1."
  block += [(mlp + name, path, t) for name, path, t in MLP]
  block.append((mlp + "layer_norm.weight", ("mlp_norm", "scale"), False))
  return block


def _num_layers(model: ml_collections.ConfigDict) -> dict[str, int]:
  return {"encoder": model.num_layers, "decoder": model.get("num_decoder_layers", 0) or model.num_layers}


def table(model: ml_collections.ConfigDict) -> tables.Table:
  """Every tensor of a T5ForConditionalGeneration checkpoint and its lm parameter (unscanned)."""
  entries = [(SHARED, ("token_embed", "embedding"), False)]
  for stack, num_layers in _num_layers(model).items():
    entries.append((f"{stack}.{RELATIVE_BIAS}", (stack, "relative_bias"), False))
    for i in range(num_layers):
      entries += [(f"{stack}.block.{i}.{name}", (stack, f"layers_{i}", *path), t) for name, path, t in _block(stack == "decoder")]
    entries.append((f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), False))
  if not model.tie_embeddings:
    entries.append((LM_HEAD, ("lm_head", "kernel"), True))
  return entries


def to_hf_tensors(model: ml_collections.ConfigDict, params: dict) -> dict[str, np.ndarray]:
  """lm EncoderDecoder params (numpy, scanned or not) -> T5ForConditionalGeneration state dict."""
  if model.num_kv_heads != model.num_heads:
    raise ConfigError("model.num_kv_heads: T5ForConditionalGeneration has no grouped-query attention; it must equal model.num_heads")
  params = dict(params)
  for stack, num_layers in _num_layers(model).items():
    params[stack] = tables.unstack_layers(params[stack], num_layers)
  return tables.export_table(table(model), params)


def hf_config(model: ml_collections.ConfigDict, common: dict, decoder_start_id: int) -> dict:
  """config.json of a T5ForConditionalGeneration; `common` holds the fields every family writes. As in T5, the
  token the decoder starts from is also the padding token (the one transformers shifts labels right with)."""
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", **common,
      "decoder_start_token_id": decoder_start_id, "pad_token_id": decoder_start_id,
      "d_model": model.embed_dim, "d_kv": layers.head_dim(model), "d_ff": model.mlp_dim, "num_heads": model.num_heads,
      "num_layers": model.num_layers, "num_decoder_layers": _num_layers(model)["decoder"],
      "relative_attention_num_buckets": model.relative_buckets,
      "relative_attention_max_distance": model.relative_max_distance, "layer_norm_epsilon": model.norm_eps,
      "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
      "dropout_rate": 0.0, "scale_decoder_outputs": model.tie_embeddings,
  }  # fmt: skip


def _unsupported(feature: str) -> ConfigError:
  return ConfigError(f"config.json: {feature} is not supported by lm's T5")


def model_config_from_hf(hf: dict, model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`model` (the default model section) set to a T5ForConditionalGeneration config.json."""
  feed_forward = hf.get("feed_forward_proj", "relu")
  if feed_forward != "gated-gelu":
    original = " (the original T5's; lm reads T5 v1.1's gated-gelu)" if feed_forward == "relu" else " (lm reads gated-gelu)"
    raise _unsupported(f"feed_forward_proj={feed_forward!r}{original}")
  scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
  num_layers = hf["num_layers"]
  model.update(
      family="t5", vocab_size=hf["vocab_size"], num_layers=num_layers, embed_dim=hf["d_model"],
      num_heads=hf["num_heads"], num_kv_heads=hf["num_heads"], head_dim=hf["d_kv"], mlp_dim=hf["d_ff"],
      num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
      relative_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_max_distance=hf.get("relative_attention_max_distance", 128),
      # T5 has no position table; it was pretrained on 512 tokens.
      max_seq_len=hf.get("n_positions") or 512, norm_eps=hf.get("layer_norm_epsilon", 1e-6),
      tie_embeddings=bool(scaled), dropout_rate=0.0,
  )  # fmt: skip
  return model


def from_hf_tensors(model: ml_collections.ConfigDict, tensors: dict[str, np.ndarray]) -> dict:
  """T5ForConditionalGeneration state dict -> lm EncoderDecoder params, each stack scanned if model.scan_layers."""
  has_head = LM_HEAD in tensors and not (SHARED in tensors and np.array_equal(tensors[LM_HEAD], tensors[SHARED]))
  if model.tie_embeddings and has_head:
    raise _unsupported(f"an {LM_HEAD} apart from the shared embedding with decoder outputs scaled by d_model ** -0.5")
  if not model.tie_embeddings and LM_HEAD not in tensors and SHARED in tensors:
    # transformers 5 saves an unscaled model whose output layer is the shared embedding without lm_head.weight.
    tensors = {**tensors, LM_HEAD: tensors[SHARED]}
  params = tables.import_table(table(model), model, tensors)
  if model.scan_layers:
    for stack, num_layers in _num_layers(model).items():
      params[stack] = tables.stack_layers(params[stack], num_layers)
  return params
