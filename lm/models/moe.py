"""Mixtral's sparse MLP: each token's top-k of E SwiGLU experts, mixed by the router's renormalized probabilities.

Tokens reach the experts through one-hot dispatch and combine einsums, per row (GShard's way):
every shape is static, and the expert dimension of the weights and of the dispatched tokens is
named "expert", so XLA shards it over the mesh's `expert` axis and moves tokens with all-to-alls,
with no hand-written communication.

Capacity (`model.expert_capacity_factor`):
- 0, the default: dropless. Each expert has room for every token of its row, so no token is ever
  dropped and the block computes exactly what Mixtral (and Hugging Face) compute; that is why it is
  the default, and what makes the parity tests exact. The dispatch tensor is [B, T, E, T]: fine
  for the sizes lm trains on one host, quadratic in the row length.
- c > 0: room for ceil(c * T * k / E) token choices per expert per row; choices past that (later
  tokens first) are dropped, their share of the block's output is zero and the residual stream
  carries the token on. Memory and FLOPs then grow linearly in T; `dropped` reports the fraction.

Shape letters: B batch, T length, D embed, F expert MLP width, E experts, K experts per token,
C capacity (token slots per expert per row).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import layers


def capacity(cfg: layers.ModelConfig, length: int) -> int:
  """Token slots per expert per row."""
  if cfg.expert_capacity_factor == 0:
    return length
  slots = math.ceil(cfg.expert_capacity_factor * length * cfg.experts_per_token / cfg.num_experts)
  return max(1, min(length, slots))


def route(logits_BTE: jax.Array, experts_per_token: int, slots: int):
  """The dispatch and combine tensors [B, T, E, C] of router logits, and the router's statistics.

  A token's K choices are its K most probable experts, weighted by their probabilities renormalized
  to sum to one (Mixtral). Each expert takes token choices in token order until its C slots are full.
  """
  num_experts = logits_BTE.shape[-1]
  probs_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
  top_probs_BTK, experts_BTK = jax.lax.top_k(probs_BTE, experts_per_token)
  gates_BTK = top_probs_BTK / jnp.sum(top_probs_BTK, axis=-1, keepdims=True)

  chosen_BTKE = jax.nn.one_hot(experts_BTK, num_experts, dtype=jnp.int32)
  batch, length = experts_BTK.shape[:2]
  # Each choice's place in its expert's queue: the choices before it (earlier tokens, then this
  # token's higher-ranked choices) that went to the same expert.
  queue_BTKE = jnp.cumsum(chosen_BTKE.reshape(batch, length * experts_per_token, num_experts), axis=1)
  queue_BTKE = queue_BTKE.reshape(chosen_BTKE.shape) - 1
  slot_BTK = jnp.sum(queue_BTKE * chosen_BTKE, axis=-1)
  kept_BTK = slot_BTK < slots
  slot_BTKC = jax.nn.one_hot(jnp.where(kept_BTK, slot_BTK, slots), slots, dtype=jnp.float32)  # dropped: all zeros
  dispatch_BTEC = jnp.einsum("btke,btkc->btec", chosen_BTKE.astype(jnp.float32), slot_BTKC)
  combine_BTEC = jnp.einsum("btke,btkc,btk->btec", chosen_BTKE.astype(jnp.float32), slot_BTKC, gates_BTK)

  # Switch Transformer's load-balancing loss, as transformers' Mixtral computes it for one layer: E *
  # the sum over choice ranks and experts of (share of the rank's choices routed there) * (mean router
  # probability); K when balanced.
  choice_share_KE = jnp.mean(chosen_BTKE, axis=(0, 1), dtype=jnp.float32)
  mean_prob_E = jnp.mean(probs_BTE, axis=(0, 1))
  stats = {
      "aux_loss": num_experts * jnp.sum(choice_share_KE * mean_prob_E),
      "expert_load": jnp.sum(choice_share_KE, axis=0) / experts_per_token,  # [E], sums to 1
      "dropped": 1.0 - jnp.mean(kept_BTK.astype(jnp.float32)),
  }
  return dispatch_BTEC, combine_BTEC, stats


class MoeMlp(nn.Module):
  """The block's MLP as model.num_experts SwiGLU experts of width model.mlp_dim and a linear router.

  Sows the router's statistics (see `route`) into "intermediates" as "router".
  """

  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.cfg
    num_experts, embed_dim, mlp_dim = cfg.num_experts, cfg.embed_dim, cfg.mlp_dim
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def kernel(name, axes, shape, residual=False):
      std = cfg.init_std / (2 * cfg.num_layers) ** 0.5 if residual else cfg.init_std
      return self.param(name, nn.with_logical_partitioning(nn.initializers.normal(std), axes), shape, param_dtype)

    router_DE = kernel("router", ("embed", None), (embed_dim, num_experts))
    gate_EDF = kernel("gate", ("expert", "embed", "mlp"), (num_experts, embed_dim, mlp_dim))
    up_EDF = kernel("up", ("expert", "embed", "mlp"), (num_experts, embed_dim, mlp_dim))
    down_EFD = kernel("down", ("expert", "mlp", "embed"), (num_experts, mlp_dim, embed_dim), residual=True)

    # Routing decisions in float32: bfloat16 logits tie and flip experts between equal runs.
    logits_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), router_DE.astype(jnp.float32))
    dispatch_BTEC, combine_BTEC, stats = route(logits_BTE, cfg.experts_per_token, capacity(cfg, x_BTD.shape[1]))
    self.sow("intermediates", "router", stats)

    x_BTD = x_BTD.astype(dtype)
    x_EBCD = jnp.einsum("btec,btd->ebcd", dispatch_BTEC.astype(dtype), x_BTD)
    expert_axes = ("activation_expert", "activation_expert_batch", None, "activation_embed")
    x_EBCD = layers.constrain(x_EBCD, expert_axes)
    gate_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, gate_EDF.astype(dtype))
    up_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, up_EDF.astype(dtype))
    hidden_EBCF = nn.silu(gate_EBCF) * up_EBCF
    hidden_EBCF = layers.constrain(hidden_EBCF, ("activation_expert", "activation_expert_batch", None, "activation_mlp"))
    out_EBCD = layers.constrain(jnp.einsum("ebcf,efd->ebcd", hidden_EBCF, down_EFD.astype(dtype)), expert_axes)
    out_BTD = jnp.einsum("btec,ebcd->btd", combine_BTEC.astype(dtype), out_EBCD)
    return layers.constrain(out_BTD, layers.ACTIVATION_AXES)
