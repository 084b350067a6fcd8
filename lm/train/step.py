"""The training step: a pure function of (state, batch, rng), jitted with explicit shardings.

Shape letters: B batch, T length, V vocab, M microbatches.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lm import sharding
from lm.models import transformer
from lm.train import optimizer
from lm.train.state import TrainState

# inputs, targets, positions [B, T] int32; weights [B, T] float32; segment_ids [B, T] int32 numbering the
# packed documents of each row, absent when every row is one document (synthetic data).
Batch = dict[str, jax.Array]


def _chunk_length(length: int, chunk_len: int) -> int:
  """The largest divisor of `length` that is at most `chunk_len` (0: the whole length)."""
  if chunk_len <= 0 or chunk_len >= length:
    return length
  return max(size for size in range(1, chunk_len + 1) if length % size == 0)


def token_losses(params, model_config, hidden_BTD: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy and log partition function log(Z), both [B, T] float32.

  The logits are computed model.loss_chunk_len positions at a time and recomputed in the backward
  pass, so the [B, T, V] float32 logits never exist whole: memory holds one [B, C, V] chunk. With one
  chunk (loss_chunk_len 0, or at least T), they are computed whole and kept.
  Chunk c takes positions c, c + n, c + 2n, ... (n chunks), so a device that holds a block of the
  sequence holds a share of every chunk.
  """
  batch, length, embed_dim = hidden_BTD.shape
  chunk = _chunk_length(length, model_config.loss_chunk_len)
  num_chunks = length // chunk

  def chunk_losses(carry, chunk_inputs):
    hidden_BCD, targets_BC = chunk_inputs
    logits_BCV = transformer.output_logits(params, model_config, hidden_BCD)
    log_z_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_logit_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    return carry, (log_z_BC - target_logit_BC, log_z_BC)

  if num_chunks == 1:  # all positions at once: the logits are kept for the backward pass
    _, (cross_entropy_BT, log_z_BT) = chunk_losses(None, (hidden_BTD, targets_BT))
    return cross_entropy_BT, log_z_BT
  hidden_NBCD = hidden_BTD.reshape(batch, chunk, num_chunks, embed_dim).transpose(2, 0, 1, 3)
  targets_NBC = targets_BT.reshape(batch, chunk, num_chunks).transpose(2, 0, 1)
  _, (cross_entropy_NBC, log_z_NBC) = jax.lax.scan(jax.checkpoint(chunk_losses), None, (hidden_NBCD, targets_NBC))
  cross_entropy_BT = cross_entropy_NBC.transpose(1, 2, 0).reshape(batch, length)
  log_z_BT = log_z_NBC.transpose(1, 2, 0).reshape(batch, length)
  return cross_entropy_BT, log_z_BT


def loss_sums(
    params, model: nn.Module, batch: Batch, rng: jax.Array, z_loss_weight: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(sum of weighted loss incl. z-loss, (sum of weighted cross-entropy, sum of weights)) over a batch.

  Sums rather than means, so microbatches add up to exactly the full batch's totals.
  """
  hidden_BTD = model.apply(
      {"params": params},
      batch["inputs"],
      batch.get("segment_ids"),
      batch["positions"],
      deterministic=False,
      hidden_only=True,
      rngs={"dropout": rng},
  )
  cross_entropy_BT, log_z_BT = token_losses(params, model.cfg, hidden_BTD, batch["targets"])
  weights_BT = batch["weights"]
  objective = jnp.sum((cross_entropy_BT + z_loss_weight * log_z_BT**2) * weights_BT)
  return objective, (jnp.sum(cross_entropy_BT * weights_BT), jnp.sum(weights_BT))


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[B, ...] -> [M, B/M, ...]. Microbatch m takes rows m, m+M, m+2M, ..., so every device holds a share of each."""

  def split(x):
    return x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_microbatches: int,
    z_loss_weight: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on the global batch, accumulating gradients over microbatches weighted by token count.

  Gradients, the optimizer's state and its update are float32 whatever model.param_dtype stores
  the parameters in: bfloat16 or float16 gradients of a sum over many tokens would lose their small
  entries and overflow the large ones. The updated parameters are rounded back to their dtype.
  """
  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
  params_f32 = optimizer.to_float32(state.params)

  def accumulate(totals, microbatch_and_index):
    microbatch, index = microbatch_and_index
    (_, (cross_entropy_sum, weight_sum)), grads = grad_fn(
        params_f32, model, microbatch, jax.random.fold_in(rng, index), z_loss_weight
    )
    grad_sums, total_cross_entropy, total_weight = totals
    grad_sums = jax.tree.map(jnp.add, grad_sums, grads)
    return (grad_sums, total_cross_entropy + cross_entropy_sum, total_weight + weight_sum), None

  zeros = (jax.tree.map(jnp.zeros_like, params_f32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  microbatches = split_microbatches(batch, num_microbatches)
  (grad_sums, cross_entropy_sum, weight_sum), _ = jax.lax.scan(
      accumulate, zeros, (microbatches, jnp.arange(num_microbatches))
  )
  num_tokens = jnp.maximum(weight_sum, 1.0)  # a batch of padding only must not divide by zero
  grads = jax.tree.map(lambda g: g / num_tokens, grad_sums)

  updates, opt_state = tx.update(grads, state.opt_state, params_f32)
  params = optax.apply_updates(state.params, updates)  # in float32, rounded to each parameter's dtype
  bad_steps_in_a_row, bad_steps = optimizer.bad_steps(opt_state)
  metrics = {
      "loss": cross_entropy_sum / num_tokens,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
      "tokens": weight_sum,
      "bad_steps_in_a_row": bad_steps_in_a_row,  # steps with NaN or Inf gradients, not applied
      "bad_steps": bad_steps,
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, byte_lengths_V: jax.Array, *, model: nn.Module) -> dict[str, jax.Array]:
  """Sums over a batch: weighted cross-entropy (nats), tokens, and the UTF-8 bytes of text they stand for."""
  hidden_BTD = model.apply(
      {"params": params}, batch["inputs"], batch.get("segment_ids"), batch["positions"], hidden_only=True
  )
  cross_entropy_BT, _ = token_losses(params, model.cfg, hidden_BTD, batch["targets"])
  weights_BT = batch["weights"]
  return {
      "loss_sum": jnp.sum(cross_entropy_BT * weights_BT),
      "tokens": jnp.sum(weights_BT),
      "bytes": jnp.sum(byte_lengths_V[batch["targets"]] * weights_BT),
  }


def make_eval_step(model: nn.Module, mesh: Mesh, axis_rules: sharding.Rules, param_shardings) -> sharding.MeshJit:
  """Jits `eval_step` on the params' shardings; call as step(params, batch, byte_lengths_V) -> sums."""
  batch_sharding = sharding.logical_sharding(mesh, axis_rules, sharding.BATCH_AXES)
  jitted = jax.jit(
      functools.partial(eval_step, model=model),
      in_shardings=(param_shardings, batch_sharding, sharding.replicated(mesh)),
      out_shardings=sharding.replicated(mesh),
  )
  return sharding.MeshJit(jitted, mesh, axis_rules)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    train_config,
    mesh: Mesh,
    axis_rules: sharding.Rules,
    shardings: TrainState,
) -> sharding.MeshJit:
  """Jits `train_step` with the state's shardings in and out, the state donated, metrics replicated.

  Call the result as step(state, batch, rng) -> (state, metrics).
  """
  batch_sharding: NamedSharding = sharding.logical_sharding(mesh, axis_rules, sharding.BATCH_AXES)
  step = functools.partial(
      train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      num_microbatches=train_config.microbatches,
      z_loss_weight=train_config.z_loss_weight,
  )
  jitted = jax.jit(
      step,
      in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )
  return sharding.MeshJit(jitted, mesh, axis_rules)
