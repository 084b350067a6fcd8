"""TrainState and its sharded creation: parameters are born on their devices, never gathered."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lm import sharding


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step changes, and nothing a checkpoint cannot hold."""

  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any


def _init_boxed(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """The initial state with parameters still wrapped in their logical-axis metadata."""
  tokens_BT = jnp.zeros((1, 1), jnp.int32)
  params = model.init(rng, tokens_BT, tokens_BT, tokens_BT)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, axis_rules: sharding.Rules):
  """The NamedSharding of every leaf of the TrainState, from the parameters' logical axis names."""
  abstract_state = jax.eval_shape(lambda rng: _init_boxed(model, tx, rng), jax.random.key(0))
  logical_specs = nn.get_partition_spec(abstract_state)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, axis_rules)


def create(
    model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, axis_rules: sharding.Rules, seed: int
) -> tuple[TrainState, TrainState]:
  """Returns (state, its shardings); the init runs under jit with out_shardings, so each device makes only its shard."""
  shardings = state_shardings(model, tx, mesh, axis_rules)
  init = jax.jit(lambda rng: nn.unbox(_init_boxed(model, tx, rng)), out_shardings=shardings)
  return init(jax.random.key(seed)), shardings
