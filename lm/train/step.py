"""The training step: a pure function of (state, batch, rng), jitted with explicit shardings.

Shape letters: B batch, T length, V vocab, M microbatches.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lm import objectives, sharding
from lm.train import optimizer
from lm.train.state import TrainState

Batch = dict[str, jax.Array]  # the keys and shapes of lm.data.batch


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
    objective: objectives.Objective,
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
  grad_fn = jax.value_and_grad(objective.loss_sums, has_aux=True)
  params_f32 = optimizer.to_float32(state.params)

  def accumulate(totals, microbatch_and_index):
    microbatch, index = microbatch_and_index
    (_, (cross_entropy_sum, weight_sum, router)), grads = grad_fn(
        params_f32, model, microbatch, jax.random.fold_in(rng, index), z_loss_weight
    )
    grad_sums, total_cross_entropy, total_weight, router_sums = totals
    grad_sums = jax.tree.map(jnp.add, grad_sums, grads)
    router_sums = jax.tree.map(jnp.add, router_sums, router)
    return (grad_sums, total_cross_entropy + cross_entropy_sum, total_weight + weight_sum, router_sums), None

  microbatches = split_microbatches(batch, num_microbatches)
  router_zeros = {name: jnp.zeros((), jnp.float32) for name in objectives.base.ROUTER_STATS} if model.cfg.get("num_experts") else {}
  zeros = (jax.tree.map(jnp.zeros_like, params_f32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), router_zeros)
  (grad_sums, cross_entropy_sum, weight_sum, router_sums), _ = jax.lax.scan(
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
      # A mixture of experts' router: means over microbatches (see objectives.base.router_stats).
      **{name: total / num_microbatches for name, total in router_sums.items()},
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(
    model: nn.Module,
    objective: objectives.Objective,
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
      objective=objective,
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
