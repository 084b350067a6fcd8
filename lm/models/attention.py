"""Causal self-attention (multi-head or grouped-query) with a choice of kernel.

Shape letters: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head dim, D embed dim.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lm.models import layers


def attention_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T, S] True where query t may attend to key s: causal, and within the same packed document."""
  length = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  same_document_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TS[None] & same_document_BTS


def xla_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
  """Plain einsum attention; softmax in float32. Returns [B, T, N, H]."""
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS * head_dim**-0.5
  mask_B11TS = attention_mask(segment_ids_BT)[:, None, None]
  # Every query sees at least itself, so no row is fully masked and the finite fill never leaks.
  scores_BKGTS = jnp.where(mask_B11TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(batch, length, num_heads, head_dim)


def dot_product_attention(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array
) -> jax.Array:
  """jax.nn.dot_product_attention, which picks cuDNN's fused kernel on GPUs. Returns [B, T, N, H]."""
  same_document_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=same_document_B1TS, is_causal=True)


KERNELS = {"xla": xla_attention, "dot_product": dot_product_attention}


class Attention(nn.Module):
  """Projects to queries, keys and values, applies the kernel, and projects back to D."""

  cfg: layers.ModelConfig

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

    out_BTNH = KERNELS[cfg.attention](q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)

    out_BTD = layers.Projection(cfg, (cfg.embed_dim,), ("heads", "head_dim", "embed"), residual=True, name="out")(out_BTNH)
    return checkpoint_name(out_BTD, "out_proj")
