"""BERT's Hugging Face table: lm's Encoder (family "bert") <-> transformers' `BertForMaskedLM`.

The MLM decoder is the token embedding in both (tied), so `cls.predictions.decoder.weight` is
never written and, when a checkpoint holds one, it must equal the embedding. lm reads token type 0
only; the whole type table is carried both ways all the same.

Shape letters: D embed dim, N heads, H head dim, F MLP width, V vocab.
"""

import ml_collections
import numpy as np

from lm.config import ConfigError
from lm.interop import tables

# Per layer: (name under bert.encoder.layer.{i}., path under lm's layers_{i}, torch Linear weight).
LAYER = (
    ("attention.self.query.weight", ("attn", "query", "kernel"), True),
    ("attention.self.query.bias", ("attn", "query", "bias"), False),
    ("attention.self.key.weight", ("attn", "key", "kernel"), True),
    ("attention.self.key.bias", ("attn", "key", "bias"), False),
    ("attention.self.value.weight", ("attn", "value", "kernel"), True),
    ("attention.self.value.bias", ("attn", "value", "bias"), False),
    ("attention.output.dense.weight", ("attn", "out", "kernel"), True),
    ("attention.output.dense.bias", ("attn", "out", "bias"), False),
    ("attention.output.LayerNorm.weight", ("attn_norm", "scale"), False),
    ("attention.output.LayerNorm.bias", ("attn_norm", "bias"), False),
    ("intermediate.dense.weight", ("mlp", "up", "kernel"), True),
    ("intermediate.dense.bias", ("mlp", "up", "bias"), False),
    ("output.dense.weight", ("mlp", "down", "kernel"), True),
    ("output.dense.bias", ("mlp", "down", "bias"), False),
    ("output.LayerNorm.weight", ("mlp_norm", "scale"), False),
    ("output.LayerNorm.bias", ("mlp_norm", "bias"), False),
)
OUTER = (
    ("bert.embeddings.word_embeddings.weight", ("token_embed", "embedding"), False),
    ("bert.embeddings.position_embeddings.weight", ("position_embed", "embedding"), False),
    ("bert.embeddings.token_type_embeddings.weight", ("type_embed", "embedding"), False),
    ("bert.embeddings.LayerNorm.weight", ("embed_norm", "scale"), False),
    ("bert.embeddings.LayerNorm.bias", ("embed_norm", "bias"), False),
    ("cls.predictions.transform.dense.weight", ("mlm_transform", "kernel"), True),
    ("cls.predictions.transform.dense.bias", ("mlm_transform", "bias"), False),
    ("cls.predictions.transform.LayerNorm.weight", ("mlm_norm", "scale"), False),
    ("cls.predictions.transform.LayerNorm.bias", ("mlm_norm", "bias"), False),
    ("cls.predictions.bias", ("mlm_bias",), False),
)
DECODER = "cls.predictions.decoder.weight"


def table(model: ml_collections.ConfigDict) -> tables.Table:
  """Every tensor of a BertForMaskedLM checkpoint and its lm parameter (unscanned)."""
  layers = [(f"bert.encoder.layer.{i}.{name}", (f"layers_{i}", *path), t) for i in range(model.num_layers) for name, path, t in LAYER]
  return list(OUTER) + layers


def to_hf_tensors(model: ml_collections.ConfigDict, params: dict) -> dict[str, np.ndarray]:
  """lm Encoder params (numpy, scanned or not) -> BertForMaskedLM state dict."""
  if model.num_kv_heads != model.num_heads:
    raise ConfigError("model.num_kv_heads: BertForMaskedLM has no grouped-query attention; it must equal model.num_heads")
  if model.get("head_dim", 0) not in (0, model.embed_dim // model.num_heads):
    raise ConfigError("model.head_dim: BertForMaskedLM's heads are embed_dim // num_heads wide; leave it 0")
  return tables.export_table(table(model), tables.unstack_layers(params, model.num_layers))


def hf_config(model: ml_collections.ConfigDict, common: dict) -> dict:
  """config.json of a BertForMaskedLM; `common` holds the fields every family writes."""
  return {
      "architectures": ["BertForMaskedLM"], "model_type": "bert", **common, "tie_word_embeddings": True,
      "hidden_size": model.embed_dim, "intermediate_size": model.mlp_dim, "num_hidden_layers": model.num_layers,
      "num_attention_heads": model.num_heads, "max_position_embeddings": model.max_seq_len,
      "type_vocab_size": model.type_vocab_size, "layer_norm_eps": model.norm_eps, "hidden_act": "gelu",
      "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
  }  # fmt: skip


def _unsupported(feature: str) -> ConfigError:
  return ConfigError(f"config.json: {feature} is not supported by lm's BERT")


def model_config_from_hf(hf: dict, model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`model` (the default model section) set to a BertForMaskedLM config.json."""
  if hf.get("hidden_act", "gelu") != "gelu":
    raise _unsupported(f"hidden_act={hf['hidden_act']!r} (lm's BERT uses exact GELU, 'gelu')")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise _unsupported(f"position_embedding_type={hf['position_embedding_type']!r} (lm reads absolute)")
  if hf.get("is_decoder") or hf.get("add_cross_attention"):
    raise _unsupported("a BERT decoder (is_decoder or add_cross_attention)")
  if hf.get("tie_word_embeddings", True) is False:
    raise _unsupported("tie_word_embeddings=false (lm's MLM head reads the token embedding)")
  if hf["hidden_size"] % hf["num_attention_heads"]:
    raise _unsupported(f"hidden_size={hf['hidden_size']} that num_attention_heads={hf['num_attention_heads']} do not divide")
  model.update(
      family="bert", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], embed_dim=hf["hidden_size"],
      num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_attention_heads"], head_dim=0,
      mlp_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 512),
      type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12), tie_embeddings=True,
      dropout_rate=0.0,
  )  # fmt: skip
  return model


def from_hf_tensors(model: ml_collections.ConfigDict, tensors: dict[str, np.ndarray]) -> dict:
  """BertForMaskedLM (or BertForPreTraining) state dict -> lm Encoder params, scanned if model.scan_layers."""
  # Google's original checkpoints, as the Hub still holds them, name LayerNorm parameters gamma and beta.
  renamed = {name.removesuffix(".gamma") + ".weight": v for name, v in tensors.items() if name.endswith("LayerNorm.gamma")}
  renamed.update({name.removesuffix(".beta") + ".bias": v for name, v in tensors.items() if name.endswith("LayerNorm.beta")})
  tensors = {**tensors, **renamed}
  embedding = tensors.get(OUTER[0][0])
  if DECODER in tensors and embedding is not None and not np.array_equal(tensors[DECODER], embedding):
    raise _unsupported(f"an MLM decoder ({DECODER}) apart from the word embedding")
  params = tables.import_table(table(model), model, tensors)
  return tables.stack_layers(params, model.num_layers) if model.scan_layers else params
