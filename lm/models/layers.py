"""Building blocks: projections, embeddings, norms, MLPs and rotary position encoding.

Parameters carry logical axis names; activations are constrained to logical axes so the
config's rules, not this code, decide how everything is sharded.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

ModelConfig = ml_collections.FrozenConfigDict  # the `model` section of the config

# Logical axes of the residual stream [B, T, D].
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")
BIASED_FAMILIES = ("gpt2", "bert")  # whose projections and norms have biases
RMS_NORM_FAMILIES = ("llama", "t5")  # RMSNorm (no mean, no bias); the others LayerNorm


def head_dim(cfg: ModelConfig) -> int:
  """Width of one attention head: model.head_dim, or (0, the default) embed_dim // num_heads."""
  return cfg.get("head_dim", 0) or cfg.embed_dim // cfg.num_heads


def constrain(x: jax.Array, logical_axes: Sequence[str]) -> jax.Array:
  """Pins an activation's sharding to these logical axes (a no-op outside a mesh context)."""
  return nn.with_logical_constraint(x, tuple(logical_axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def logits_einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """jnp.einsum(equation, x, w) of compute-dtype operands, accumulated and returned in float32 (logits).

  The backward pass casts the float32 cotangent to the operands' dtype before its two products. Left
  to autodiff, a bfloat16 operand meets a float32 cotangent and XLA runs both products in float32:
  on an H100 that made the loss's backward matmuls tf32 kernels, 17 of GPT-2 124M's 123 ms a step
  (benchmarks/RESULTS.md). In float32 this is autodiff exactly.
  """
  return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


def _logits_einsum_forward(equation, x, w):
  return logits_einsum(equation, x, w), (x, w)


def _logits_einsum_backward(equation, operands, cotangent):
  x, w = operands
  _, vjp = jax.vjp(functools.partial(jnp.einsum, equation), x, w)
  return vjp(cotangent.astype(x.dtype))


logits_einsum.defvjp(_logits_einsum_forward, _logits_einsum_backward)


def scan_unroll(cfg: ModelConfig, num_layers: int) -> int:
  """Layers per loop iteration of a scanned stack: model.scan_unroll, or for 0 (auto) every layer on a GPU
  and one elsewhere. On an H100 the loop cost GPT-2 124M a quarter of its speed (123 vs 93 ms a step)
  and Llama 1B 14%, in copies of the stacked weights and residuals; unrolled, the same stacked
  parameters compile in 12 s instead of 8 (benchmarks/RESULTS.md). On TPUs and CPUs the loop stays."""
  if cfg.scan_unroll:
    return cfg.scan_unroll
  return num_layers if jax.default_backend() == "gpu" else 1


class Projection(nn.Module):
  """x [..., *contracted] @ kernel [*contracted, *features] (+ bias for GPT-2 and BERT), with named kernel axes.

  Written out rather than nn.DenseGeneral, which creates a flattened 2-D kernel that cannot carry
  one logical name per dimension.
  """

  cfg: ModelConfig
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]  # one name per kernel dimension: contracted ones, then features
  residual: bool = False  # writes into the residual stream: init std / sqrt(2 * num_layers) (GPT-2's init)
  bias: bool = True  # GPT-2 and BERT add a bias unless this is False; Llama and T5 never do
  fp8: bool = True  # in fp8 when cfg.fp8_matmuls (the output layer stays in cfg.dtype)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    num_contracted = len(self.kernel_axes) - len(self.features)
    std = cfg.init_std / (2 * cfg.num_layers) ** 0.5 if self.residual else cfg.init_std
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(std), self.kernel_axes),
        x.shape[x.ndim - num_contracted :] + tuple(self.features),
        jnp.dtype(cfg.param_dtype),
    )
    compute_dtype = jnp.dtype(cfg.dtype)
    x, kernel = x.astype(compute_dtype), kernel.astype(compute_dtype)
    if cfg.fp8_matmuls and self.fp8:
      y = fp8_gradient(jnp.tensordot(fp8_forward(x), fp8_forward(kernel), axes=num_contracted))
    else:
      y = jnp.tensordot(x, kernel, axes=num_contracted)
    if self.bias and cfg.family in BIASED_FAMILIES:
      bias = self.param(
          "bias",
          nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[num_contracted:]),
          tuple(self.features),
          jnp.dtype(cfg.param_dtype),
      )
      y = y + bias.astype(compute_dtype)
    return y


def quantize_dequantize(x: jax.Array, fp8_dtype) -> jax.Array:
  """x rounded to `fp8_dtype` under a per-tensor scale (its largest magnitude maps to the format's largest
  value), returned in x's dtype. XLA on Hopper turns a product of such values into an fp8 matmul.

  An all-zero or non-finite maximum keeps a scale of 1: zeros stay zeros, Inf saturates, NaN stays NaN.
  """
  largest = float(jnp.finfo(fp8_dtype).max)
  amax = jax.lax.stop_gradient(jnp.max(jnp.abs(x)).astype(jnp.float32))
  scale = jnp.where((amax > 0) & jnp.isfinite(amax), amax, largest) / largest  # float32
  quantized = jnp.clip(x.astype(jnp.float32) / scale, -largest, largest).astype(fp8_dtype)
  return quantized.astype(x.dtype) * scale.astype(x.dtype)


@jax.custom_vjp
def fp8_forward(x: jax.Array) -> jax.Array:
  """Activations and weights in the forward pass: e4m3 (more precision), gradient passed straight through."""
  return quantize_dequantize(x, jnp.float8_e4m3fn)


fp8_forward.defvjp(lambda x: (fp8_forward(x), None), lambda _, g: (g,))


@jax.custom_vjp
def fp8_gradient(y: jax.Array) -> jax.Array:
  """Identity forward; the gradient arriving at a matmul's output in e5m2 (more range), as Transformer Engine does."""
  return y


fp8_gradient.defvjp(lambda y: (y, None), lambda _, g: (quantize_dequantize(g, jnp.float8_e5m2),))


def embedding(cfg: ModelConfig, num_embeddings: int, row_axis: str | None, name: str) -> nn.Embed:
  """A [num_embeddings, embed_dim] lookup table (tokens, or GPT-2's and BERT's learned positions)."""
  return nn.Embed(
      num_embeddings=num_embeddings,
      features=cfg.embed_dim,
      dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (row_axis, "embed")),
      name=name,
  )


def norm(cfg: ModelConfig, name: str | None) -> nn.Module:
  """RMSNorm for Llama and T5, LayerNorm (with bias) for GPT-2 and BERT; statistics are computed in float32."""
  common = dict(
      epsilon=cfg.norm_eps,
      dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      name=name,
  )
  if cfg.family in RMS_NORM_FAMILIES:
    return nn.RMSNorm(**common)
  return nn.LayerNorm(bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), **common)


class Mlp(nn.Module):
  """Feed-forward block: SwiGLU (Llama), gated GELU (T5 v1.1), GELU (GPT-2: tanh approximation; BERT: exact)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.cfg
    up_BTF = checkpoint_name(Projection(cfg, (cfg.mlp_dim,), ("embed", "mlp"), name="up")(x_BTD), "mlp_up")
    if cfg.family in ("llama", "t5"):
      gate_BTF = checkpoint_name(Projection(cfg, (cfg.mlp_dim,), ("embed", "mlp"), name="gate")(x_BTD), "mlp_gate")
      activation = nn.silu if cfg.family == "llama" else functools.partial(nn.gelu, approximate=True)
      hidden_BTF = activation(gate_BTF) * up_BTF
    else:
      hidden_BTF = nn.gelu(up_BTF, approximate=cfg.family == "gpt2")
    hidden_BTF = constrain(hidden_BTF, ("activation_batch", "activation_length", "activation_mlp"))
    out_BTD = Projection(cfg, (cfg.embed_dim,), ("mlp", "embed"), residual=True, name="down")(hidden_BTF)
    return checkpoint_name(out_BTD, "mlp_down")


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """[head_dim / 2] float32 inverse frequencies of the rotary embedding, scaled as cfg.rope_scaling says
  (as transformers' modeling_rope_utils does for "linear" and "llama3")."""
  inv_freq_F = 1.0 / cfg.rope_theta ** (jnp.arange(0, head_dim(cfg), 2, dtype=jnp.float32) / head_dim(cfg))
  scaling = cfg.get("rope_scaling", "none")  # configs saved before it existed lack it
  if scaling == "linear":  # positions divided by the factor, which is the same as frequencies
    return inv_freq_F / cfg.rope_scaling_factor
  if scaling == "llama3":
    # Long wavelengths (low frequencies) are divided by the factor, short ones kept, and those between blended.
    original, factor = cfg.rope_original_max_seq_len, cfg.rope_scaling_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength_F = 2 * jnp.pi / inv_freq_F
    scaled_F = jnp.where(wavelength_F > original / low, inv_freq_F / factor, inv_freq_F)
    smooth_F = (original / wavelength_F - low) / (high - low)
    blended_F = (1 - smooth_F) * scaled_F / factor + smooth_F * scaled_F
    between_F = (wavelength_F >= original / high) & (wavelength_F <= original / low)
    return jnp.where(between_F, blended_F, scaled_F)
  return inv_freq_F


def apply_rotary(x_BTND: jax.Array, positions_BT: jax.Array, inv_freq_F: jax.Array) -> jax.Array:
  """Rotates feature pairs (i, i + D/2) by position-dependent angles (the Hugging Face Llama layout).

  inv_freq_F: rope_frequencies(cfg), one per pair.
  """
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
  sin_BT1F, cos_BT1F = jnp.sin(angles_BTF)[:, :, None, :], jnp.cos(angles_BTF)[:, :, None, :]
  x1, x2 = jnp.split(x_BTND.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
  return rotated.astype(x_BTND.dtype)
