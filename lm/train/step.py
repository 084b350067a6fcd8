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
from lm.train import optimizer
from lm.train.state import TrainState

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions [B, T] int32; weights [B, T] float32


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy and log partition function log(Z), both [B, T] float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z_BT - target_logit_BT, log_z_BT


def loss_sums(
    params, model: nn.Module, batch: Batch, rng: jax.Array, z_loss_weight: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(sum of weighted loss incl. z-loss, (sum of weighted cross-entropy, sum of weights)) over a batch.

  Sums rather than means, so microbatches add up to exactly the full batch's totals.
  """
  logits_BTV = model.apply(
      {"params": params},
      batch["inputs"],
      batch["segment_ids"],
      batch["positions"],
      deterministic=False,
      rngs={"dropout": rng},
  )
  cross_entropy_BT, log_z_BT = token_losses(logits_BTV, batch["targets"])
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
  """One optimizer update on the global batch, accumulating gradients over microbatches weighted by token count."""
  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

  def accumulate(totals, microbatch_and_index):
    microbatch, index = microbatch_and_index
    (_, (cross_entropy_sum, weight_sum)), grads = grad_fn(
        state.params, model, microbatch, jax.random.fold_in(rng, index), z_loss_weight
    )
    grad_sums, total_cross_entropy, total_weight = totals
    grad_sums = jax.tree.map(jnp.add, grad_sums, grads)
    return (grad_sums, total_cross_entropy + cross_entropy_sum, total_weight + weight_sum), None

  zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  microbatches = split_microbatches(batch, num_microbatches)
  (grad_sums, cross_entropy_sum, weight_sum), _ = jax.lax.scan(
      accumulate, zeros, (microbatches, jnp.arange(num_microbatches))
  )
  num_tokens = jnp.maximum(weight_sum, 1.0)  # a batch of padding only must not divide by zero
  grads = jax.tree.map(lambda g: g / num_tokens, grad_sums)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
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
  logits_BTV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
  cross_entropy_BT, _ = token_losses(logits_BTV, batch["targets"])
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
