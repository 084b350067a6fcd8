"""Pipeline parallelism (GPipe): the decoder's scanned layers split into stages over the mesh's `stage` axis.

The parameters keep their one layout, [L, ...] stacked on the "layers" axis, which the rules map
to the `stage` axis: the device at stage s holds layers s * L/S ... (s+1) * L/S - 1, so a checkpoint
moves between stage counts (and to no stages) unchanged. Inside the step they are viewed as
[S, L/S, ...] and every stage runs its layers on its current microbatch at once (a vmap over the
stage dimension, which XLA runs each stage on its own devices); then the activations move one
stage on (a roll over the stage dimension: a collective permute). M microbatches take M + S - 1
such ticks, of which S - 1 are spent filling and draining the pipeline: the bubble fraction is
(S - 1) / (M + S - 1). The backward pass is autodiff's reverse of the same schedule.

Shape letters: S stages, M microbatches, B batch, b rows per microbatch, T length, D embed dim.
"""

import jax
import jax.numpy as jnp

from lm.models import layers


def stages() -> int:
  """The size of the current mesh's `stage` axis (1 without one): how many stages the layers split into."""
  return dict(jax.sharding.get_abstract_mesh().shape).get("stage", 1)


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
  """The share of each stage's ticks spent idle while the pipeline fills and drains."""
  return (num_stages - 1) / (num_microbatches + num_stages - 1)


def _split_microbatches(x_B, num_microbatches: int):
  """[B, ...] -> [M, B/M, ...], microbatch m holding rows m, m + M, m + 2M, ...: each data-parallel
  device's block of rows holds a share of every microbatch, so no rows move between devices."""
  return x_B.reshape((x_B.shape[0] // num_microbatches, num_microbatches) + x_B.shape[1:]).swapaxes(0, 1)


def _join_microbatches(x_M):
  return x_M.swapaxes(0, 1).reshape((x_M.shape[0] * x_M.shape[1],) + x_M.shape[2:])


def run(block_fn, layer_params, x_BTD: jax.Array, inputs: tuple, num_stages: int, num_microbatches: int) -> jax.Array:
  """`x_BTD` through every layer of `layer_params` ([L, ...] leaves) in `num_stages` stages.

  block_fn(params of one layer, x_bTD, *inputs) -> x_bTD applies one layer; `inputs` are [B, T] arrays
  (or None) that travel with each microbatch.
  """
  num_layers = jax.tree.leaves(layer_params)[0].shape[0]
  stage_params = jax.tree.map(lambda p: p.reshape((num_stages, num_layers // num_stages) + p.shape[1:]), layer_params)
  stage_params = jax.tree.map(lambda p: layers.constrain(p, ("stage",) + (None,) * (p.ndim - 1)), stage_params)

  def stage_fn(params_of_stage, x_bTD, *stage_inputs):
    def layer(x_bTD, params_of_layer):
      return block_fn(params_of_layer, x_bTD, *stage_inputs), None

    return jax.lax.scan(layer, x_bTD, params_of_stage)[0]

  all_stages = jax.vmap(stage_fn, spmd_axis_name="stage")
  state_axes = ("activation_stage", "activation_batch", "activation_length", "activation_embed")

  micro_x = _split_microbatches(x_BTD, num_microbatches)  # [M, b, T, D]
  micro_inputs = jax.tree.map(lambda a: _split_microbatches(a, num_microbatches), inputs)
  state_x = jnp.zeros((num_stages,) + micro_x.shape[1:], x_BTD.dtype)
  state_inputs = jax.tree.map(lambda a: jnp.zeros((num_stages,) + a.shape[1:], a.dtype), micro_inputs)
  is_first_S = jnp.arange(num_stages) == 0

  def feed(state_S, microbatch):
    """Stage 0 takes `microbatch`; the others keep what they hold (no slicing of the stage dimension)."""
    return jnp.where(is_first_S.reshape((-1,) + (1,) * microbatch.ndim), microbatch[None], state_S)

  outputs = []
  for tick in range(num_microbatches + num_stages - 1):
    if tick < num_microbatches:  # after the last microbatch, stage 0 recomputes what it holds, unread
      state_x = feed(state_x, micro_x[tick])
      state_inputs = jax.tree.map(lambda s, m: feed(s, m[tick]), state_inputs, micro_inputs)
    state_x = layers.constrain(all_stages(stage_params, layers.constrain(state_x, state_axes), *state_inputs), state_axes)
    if tick >= num_stages - 1:  # the last stage finished microbatch tick - (S - 1)
      outputs.append(state_x[num_stages - 1])
    state_x = jnp.roll(state_x, 1, axis=0)
    state_inputs = jax.tree.map(lambda s: jnp.roll(s, 1, axis=0), state_inputs)
  return _join_microbatches(jnp.stack(outputs))
