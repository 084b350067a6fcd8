"""The encoder-decoder (T5 v1.1): a bidirectional encoder reads the input, a causal decoder writes the output
and reads the encoder through cross-attention.

T5 v1.1's architecture, as transformers' T5ForConditionalGeneration computes it: one token
embedding shared by both stacks; pre-norm blocks with RMSNorm (no mean, no bias); no biases
anywhere; unscaled attention scores (T5 folds 1/sqrt(head_dim) into its initialization) plus a
relative position bias that each stack computes once, from its own bucket table, and shares with
all its layers (bidirectional buckets in the encoder, causal ones in the decoder; none in
cross-attention); gated GELU; an untied output layer (a tied one scales its input by
embed_dim ** -0.5, as the original T5 did).

Shape letters: B batch, S encoder length, T decoder length, D embed dim, N heads, V vocab size,
R relative position buckets.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import attention, layers, transformer


def relative_position_buckets(relative_BTS: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucket of each key's position relative to its query (key - query): exact for small distances,
  logarithmic up to max_distance, the last bucket beyond. Bidirectional buckets give each direction half."""
  buckets_BTS = jnp.zeros_like(relative_BTS)
  if bidirectional:
    num_buckets //= 2
    buckets_BTS = buckets_BTS + (relative_BTS > 0).astype(jnp.int32) * num_buckets
    distance_BTS = jnp.abs(relative_BTS)
  else:
    distance_BTS = -jnp.minimum(relative_BTS, 0)  # only keys before the query count; after it, distance 0
  max_exact = num_buckets // 2
  is_small_BTS = distance_BTS < max_exact
  log_ratio_BTS = jnp.log(jnp.maximum(distance_BTS, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large_BTS = max_exact + (log_ratio_BTS * (num_buckets - max_exact)).astype(jnp.int32)
  large_BTS = jnp.minimum(large_BTS, num_buckets - 1)
  return buckets_BTS + jnp.where(is_small_BTS, distance_BTS, large_BTS)


class EncoderDecoderBlock(nn.Module):
  """Pre-norm block: self-attention, then (decoder) cross-attention to the encoder, then the MLP. Returns (x, None)."""

  cfg: layers.ModelConfig
  decode: bool = False
  deterministic: bool = True
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, bias_BNTS, source_BSD, source_segment_ids_BS):
    cfg = self.cfg
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    x_BTD = layers.constrain(x_BTD, layers.ACTIVATION_AXES)
    h_BTD = layers.norm(cfg, "attn_norm")(x_BTD)
    self_attention = attention.Attention(cfg, self.decode, causal=self.is_decoder, rotary=False, scale=1.0, name="attn")
    x_BTD = x_BTD + dropout(self_attention(h_BTD, segment_ids_BT, positions_BT, bias_BNTS=bias_BNTS))
    if self.is_decoder:
      h_BTD = layers.norm(cfg, "cross_norm")(x_BTD)
      cross_attention = attention.Attention(cfg, self.decode, cross=True, rotary=False, scale=1.0, name="cross_attn")
      x_BTD = x_BTD + dropout(cross_attention(h_BTD, segment_ids_BT, positions_BT, source_BSD, source_segment_ids_BS))
    h_BTD = layers.Mlp(cfg, name="mlp")(layers.norm(cfg, "mlp_norm")(x_BTD))
    x_BTD = x_BTD + dropout(h_BTD)
    return layers.constrain(x_BTD, layers.ACTIVATION_AXES), None


class Stack(nn.Module):
  """T5's encoder or decoder stack: relative position bias, blocks, final norm."""

  cfg: layers.ModelConfig
  is_decoder: bool
  num_layers: int

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, source_BSD, source_segment_ids_BS, deterministic: bool, decode: bool):
    cfg = self.cfg
    table_RN = self.param(
        "relative_bias",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, "heads")),
        (cfg.relative_buckets, cfg.num_heads),
        jnp.dtype(cfg.param_dtype),
    )
    key_positions_BS = positions_BT
    if decode:
      # The keys are the cache's slots, filled in order from position 0: slot s holds position s. The
      # slots variable only records how many there are (model.init sizes it like the self-attention cache).
      slots = self.variable("cache", "slots", jnp.zeros, (positions_BT.shape[1],), jnp.int32)
      key_positions_BS = jnp.broadcast_to(jnp.arange(slots.value.shape[0]), (positions_BT.shape[0], slots.value.shape[0]))
    relative_BTS = key_positions_BS[:, None, :] - positions_BT[:, :, None]
    buckets_BTS = relative_position_buckets(relative_BTS, not self.is_decoder, cfg.relative_buckets, cfg.relative_max_distance)
    bias_BNTS = jnp.transpose(table_RN.astype(jnp.float32)[buckets_BTS], (0, 3, 1, 2))

    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)
    stack = transformer.layer_stack(
        EncoderDecoderBlock, cfg, self.num_layers, num_inputs=5, decode=decode, deterministic=deterministic,
        is_decoder=self.is_decoder,
    )  # fmt: skip
    x_BTD = stack(x_BTD, segment_ids_BT, positions_BT, bias_BNTS, source_BSD, source_segment_ids_BS)
    x_BTD = layers.norm(cfg, "final_norm")(x_BTD)
    return nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)


class EncoderDecoder(nn.Module):
  """T5. Call with the encoder's [B, S] and the decoder's [B, T] int32 arrays (tokens, segment ids, positions).

  `encode` and `decode_with` run the two halves apart, as generation does: the encoder once, the
  decoder once per new token with a KV cache (`decode`), cross-attention's keys cached on the first call.
  """

  cfg: layers.ModelConfig
  num_classes: int = 0  # classification is not offered for encoder-decoders (config validation refuses it)
  num_inputs = 6  # encoder tokens, segment ids, positions; decoder tokens, segment ids, positions

  def setup(self):
    cfg = self.cfg
    self.token_embed = layers.embedding(cfg, cfg.vocab_size, "vocab", "token_embed")
    self.encoder = Stack(cfg, is_decoder=False, num_layers=cfg.num_layers)
    self.decoder = Stack(cfg, is_decoder=True, num_layers=cfg.num_decoder_layers or cfg.num_layers)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Projection(cfg, (cfg.vocab_size,), ("embed", "vocab"), bias=False, fp8=False)

  def __call__(
      self,
      encoder_tokens_BS: jax.Array,
      encoder_segment_ids_BS: jax.Array | None,
      encoder_positions_BS: jax.Array,
      tokens_BT: jax.Array,
      segment_ids_BT: jax.Array | None,
      positions_BT: jax.Array,
      deterministic: bool = True,
      decode: bool = False,
      hidden_only: bool = False,
  ) -> jax.Array:
    """The decoder's logits_BTV (with `hidden_only`, its final activations x_BTD)."""
    encoded_BSD = self.encode(encoder_tokens_BS, encoder_segment_ids_BS, encoder_positions_BS, deterministic)
    return self.decode_with(encoded_BSD, encoder_segment_ids_BS, tokens_BT, segment_ids_BT, positions_BT, deterministic, decode, hidden_only)

  def encode(self, tokens_BS, segment_ids_BS, positions_BS, deterministic: bool = True) -> jax.Array:
    """The encoder's output x_BSD."""
    x_BSD = layers.constrain(self.token_embed(tokens_BS), layers.ACTIVATION_AXES)
    return self.encoder(x_BSD, segment_ids_BS, positions_BS, None, None, deterministic, False)

  def decode_with(
      self, encoded_BSD, encoder_segment_ids_BS, tokens_BT, segment_ids_BT, positions_BT, deterministic=True, decode=False, hidden_only=False
  ) -> jax.Array:
    """The decoder on the encoder's output (None when decoding from a cache that holds it): logits_BTV, or x_BTD."""
    x_BTD = layers.constrain(self.token_embed(tokens_BT), layers.ACTIVATION_AXES)
    x_BTD = self.decoder(x_BTD, segment_ids_BT, positions_BT, encoded_BSD, encoder_segment_ids_BS, deterministic, decode)
    if hidden_only and not self.is_initializing():
      return x_BTD
    if self.cfg.tie_embeddings:
      logits_BTV = self.token_embed.attend(x_BTD * self.cfg.embed_dim**-0.5)
    else:
      logits_BTV = self.lm_head(x_BTD)
    return layers.constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))

  @nn.nowrap
  def output_logits(self, params: dict, x_BTD: jax.Array) -> jax.Array:
    """The output layer on `hidden_only` activations: logits_BTV in float32, the same products as the module's."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    x_BTD = x_BTD.astype(dtype)
    if cfg.tie_embeddings:
      embedding_VD = params["token_embed"]["embedding"].astype(dtype)
      logits_BTV = layers.logits_einsum("btd,vd->btv", x_BTD * cfg.embed_dim**-0.5, embedding_VD)
    else:
      kernel_DV = params["lm_head"]["kernel"].astype(dtype)
      logits_BTV = layers.logits_einsum("btd,dv->btv", x_BTD, kernel_DV)
    return layers.constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))
