"""Causal self-attention (multi-head or grouped-query) with a choice of kernel.

Shape letters: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head dim, D embed dim.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.ad_checkpoint import checkpoint_name

from lm.models import layers


def attention_mask(q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array, q_start: jax.Array | int = 0) -> jax.Array:
  """[B, T, S] True where query t may attend to key s: same packed document, and s <= the query's index.

  Query t sits at sequence index q_start + t (q_start > 0 when decoding into a KV cache).
  """
  q_index_T1 = q_start + jnp.arange(q_segment_ids_BT.shape[1])[:, None]
  causal_TS = jnp.arange(kv_segment_ids_BS.shape[1])[None, :] <= q_index_T1
  same_document_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  return causal_TS[None] & same_document_BTS


def xla_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start=None) -> jax.Array:
  """Plain einsum attention; softmax in float32. Returns [B, T, N, H]."""
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS * head_dim**-0.5
  mask_B11TS = attention_mask(q_segment_ids_BT, kv_segment_ids_BS, 0 if q_start is None else q_start)[:, None, None]
  # Every query sees at least itself, so no row is fully masked and the finite fill never leaks.
  scores_BKGTS = jnp.where(mask_B11TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(batch, length, num_heads, head_dim)


def dot_product_attention(
    q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start=None, implementation=None
) -> jax.Array:
  """jax.nn.dot_product_attention with the given implementation (None: jax chooses; jax 0.10 chooses XLA). Returns [B, T, N, H]."""
  if q_start is None:  # training: the kernel's own causal masking, which lets it skip masked blocks
    mask_B1TS, causal = (q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :])[:, None], True
  else:
    mask_B1TS, causal = attention_mask(q_segment_ids_BT, kv_segment_ids_BS, q_start)[:, None], False
  return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, is_causal=causal, implementation=implementation
  )


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start=None) -> jax.Array:
  """cuDNN's fused attention, asked for explicitly; where cuDNN cannot run it (no NVIDIA GPU, or a
  shape or dtype it does not take), the XLA implementation of the same function, with one warning."""
  args = (q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start)
  if jax.devices()[0].platform == "gpu":
    try:
      return dot_product_attention(*args, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError) as error:  # raised while tracing: nothing ran yet
      logging.log_first_n(logging.WARNING, f"cuDNN attention is not available here ({error}); using the XLA implementation", 1)
  else:
    logging.log_first_n(logging.WARNING, "model.attention=cudnn needs an NVIDIA GPU; using the XLA implementation", 1)
  return dot_product_attention(*args, implementation="xla")


KERNELS = {"xla": xla_attention, "dot_product": dot_product_attention, "cudnn": cudnn_attention}


class Attention(nn.Module):
  """Projects to queries, keys and values, applies the kernel, and projects back to D.

  With `decode`, keys and values also go into a cache (collection "cache") that grows with each
  call, so generation feeds only the new tokens. model.init(..., decode=True) sizes the cache by
  the length of its inputs.
  """

  cfg: layers.ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
    cfg = self.cfg
    head_dim = cfg.embed_dim // cfg.num_heads
    q_BTNH = layers.Projection(cfg, (cfg.num_heads, head_dim), ("embed", "heads", "head_dim"), name="query")(x_BTD)
    k_BSKH = layers.Projection(cfg, (cfg.num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="key")(x_BTD)
    v_BSKH = layers.Projection(cfg, (cfg.num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="value")(x_BTD)
    if cfg.family == "llama":
      q_BTNH = layers.apply_rotary(q_BTNH, positions_BT, cfg.rope_theta)
      k_BSKH = layers.apply_rotary(k_BSKH, positions_BT, cfg.rope_theta)
    q_BTNH = layers.constrain(q_BTNH, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
    k_BSKH = layers.constrain(k_BSKH, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
    v_BSKH = layers.constrain(v_BSKH, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
    q_BTNH = checkpoint_name(q_BTNH, "query_proj")
    k_BSKH = checkpoint_name(k_BSKH, "key_proj")
    v_BSKH = checkpoint_name(v_BSKH, "value_proj")

    kv_segment_ids_BS, q_start = segment_ids_BT, None
    if self.decode and self.has_variable("cache", "cached_key"):
      k_BSKH, v_BSKH, kv_segment_ids_BS, q_start = self._append_to_cache(k_BSKH, v_BSKH, segment_ids_BT)
    elif self.decode:  # model.init: create the empty cache, as long as these inputs
      self.variable("cache", "cached_key", jnp.zeros, k_BSKH.shape, k_BSKH.dtype)
      self.variable("cache", "cached_value", jnp.zeros, v_BSKH.shape, v_BSKH.dtype)
      self.variable("cache", "cached_segment_ids", jnp.zeros, segment_ids_BT.shape, jnp.int32)  # 0: empty slot
      self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))

    out_BTNH = KERNELS[cfg.attention](q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kv_segment_ids_BS, q_start)

    out_BTD = layers.Projection(cfg, (cfg.embed_dim,), ("heads", "head_dim", "embed"), residual=True, name="out")(out_BTNH)
    return checkpoint_name(out_BTD, "out_proj")

  def _append_to_cache(self, k_BTKH, v_BTKH, segment_ids_BT):
    """Writes the new keys / values at the cache's index; returns the whole cache and where the queries start."""
    key, value = self.variable("cache", "cached_key"), self.variable("cache", "cached_value")
    segment_ids, index = self.variable("cache", "cached_segment_ids"), self.variable("cache", "cache_index")
    start = index.value
    key.value = jax.lax.dynamic_update_slice(key.value, k_BTKH.astype(key.value.dtype), (0, start, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BTKH.astype(value.value.dtype), (0, start, 0, 0))
    segment_ids.value = jax.lax.dynamic_update_slice(segment_ids.value, segment_ids_BT.astype(jnp.int32), (0, start))
    index.value = start + k_BTKH.shape[1]
    return key.value, value.value, segment_ids.value, start
