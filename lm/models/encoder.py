"""The bidirectional encoder (BERT): every token sees its whole segment; a masked-LM head predicts tokens.

BERT's architecture, as transformers' BertForMaskedLM computes it: token + learned position +
token-type embeddings, then LayerNorm; post-LayerNorm blocks (x = norm(x + attention(x)), then
x = norm(x + mlp(x))) with biases and exact GELU; and the MLM head: a dense transform, GELU and
LayerNorm, then the token embedding (tied) plus an output bias. Pretraining uses one token type (0).

Shape letters: B batch, T length, D embed dim, V vocab size.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import attention, layers, transformer


class EncoderBlock(nn.Module):
  """Post-norm residual block: x = norm(x + attention(x)), then x = norm(x + mlp(x)). Returns (x, None) for nn.scan."""

  cfg: layers.ModelConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.cfg
    x_BTD = layers.constrain(x_BTD, layers.ACTIVATION_AXES)
    h_BTD = attention.Attention(cfg, causal=False, name="attn")(x_BTD, segment_ids_BT, positions_BT)
    x_BTD = layers.norm(cfg, "attn_norm")(x_BTD + nn.Dropout(cfg.dropout_rate)(h_BTD, deterministic=self.deterministic))
    h_BTD = layers.Mlp(cfg, name="mlp")(x_BTD)
    x_BTD = layers.norm(cfg, "mlp_norm")(x_BTD + nn.Dropout(cfg.dropout_rate)(h_BTD, deterministic=self.deterministic))
    return layers.constrain(x_BTD, layers.ACTIVATION_AXES), None


class Encoder(nn.Module):
  """BERT. Call with [B, T] int32 arrays, as the decoder is called; attention is bidirectional within segments."""

  cfg: layers.ModelConfig
  num_classes: int = 0  # > 0: a classification head ("classifier", [embed, classes]) for the objective to apply
  num_inputs = 3  # tokens, segment ids, positions

  @nn.compact
  def __call__(
      self,
      tokens_BT: jax.Array,
      segment_ids_BT: jax.Array | None,
      positions_BT: jax.Array,
      deterministic: bool = True,
      decode: bool = False,
      hidden_only: bool = False,
  ) -> jax.Array:
    """Returns the MLM head's logits_BTV; with `hidden_only`, the last block's output x_BTD (what the
    classification head reads at the first token, and `output_logits` turns into logits)."""
    del decode  # an encoder reads its whole input at once
    cfg = self.cfg
    token_embed = layers.embedding(cfg, cfg.vocab_size, "vocab", "token_embed")
    x_BTD = token_embed(tokens_BT)
    x_BTD = x_BTD + layers.embedding(cfg, cfg.max_seq_len, None, "position_embed")(positions_BT)
    token_types_BT = jnp.zeros_like(tokens_BT)  # one segment type: no sentence pairs
    x_BTD = x_BTD + layers.embedding(cfg, cfg.type_vocab_size, None, "type_embed")(token_types_BT)
    x_BTD = layers.norm(cfg, "embed_norm")(x_BTD)
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)

    stack = transformer.layer_stack(EncoderBlock, cfg, cfg.num_layers, num_inputs=2, decode=False, deterministic=deterministic)
    x_BTD = stack(x_BTD, segment_ids_BT, positions_BT)

    if self.num_classes and self.is_initializing():  # created here, applied by lm.objectives.classification
      layers.Projection(cfg, (self.num_classes,), ("embed", None), bias=False, fp8=False, name="classifier")(x_BTD)
    if hidden_only and not self.is_initializing():
      return x_BTD
    h_BTD = layers.Projection(cfg, (cfg.embed_dim,), ("embed", "mlp"), fp8=False, name="mlm_transform")(x_BTD)
    h_BTD = layers.norm(cfg, "mlm_norm")(nn.gelu(h_BTD, approximate=False))
    bias_V = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,), jnp.dtype(cfg.param_dtype))
    logits_BTV = token_embed.attend(h_BTD) + bias_V.astype(h_BTD.dtype)
    return layers.constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))

  @nn.nowrap
  def output_logits(self, params: dict, x_BTD: jax.Array) -> jax.Array:
    """The MLM head on `hidden_only` activations: logits_BTV in float32, the same products as the module's."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    transform = layers.Projection(cfg, (cfg.embed_dim,), ("embed", "mlp"), fp8=False)
    h_BTD = transform.apply({"params": params["mlm_transform"]}, x_BTD)
    # Without this constraint XLA's partitioner got the gradients wrong on a data x fsdp x tensor mesh
    # inside the chunked loss's scan (the forward was right); the sharded-equals-one-device test shows it.
    h_BTD = layers.constrain(h_BTD, layers.ACTIVATION_AXES)
    h_BTD = layers.norm(cfg, None).apply({"params": params["mlm_norm"]}, nn.gelu(h_BTD, approximate=False))
    embedding_VD = params["token_embed"]["embedding"].astype(dtype)
    logits_BTV = layers.logits_einsum("btd,vd->btv", h_BTD.astype(dtype), embedding_VD)
    logits_BTV = logits_BTV + params["mlm_bias"].astype(jnp.float32)
    return layers.constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))
