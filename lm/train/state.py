"""TrainState and its sharded creation: parameters are born on their devices, never gathered."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lm import sharding
from lm.train import optimizer


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step changes, and nothing a checkpoint cannot hold."""

  step: jax.Array  # int32 scalar: training steps taken (steps with non-finite gradients included)
  params: Any
  opt_state: Any


def _init_boxed(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """The initial state with parameters still wrapped in their logical-axis metadata."""
  params = sharding.init_params_boxed(model, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(optimizer.to_float32(params)))


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, axis_rules: sharding.Rules) -> TrainState:
  """The TrainState's shapes, dtypes and shardings, without computing anything."""
  return sharding.abstract_tree(lambda rng: _init_boxed(model, tx, rng), mesh, axis_rules)


def init(model: nn.Module, tx: optax.GradientTransformation, abstract: TrainState, seed: int) -> TrainState:
  """A fresh state; the init runs under jit with out_shardings, so each device makes only its shard."""
  make = jax.jit(lambda rng: nn.unbox(_init_boxed(model, tx, rng)), out_shardings=sharding.shardings_of(abstract))
  return make(jax.random.key(seed))


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def is_finite(state: TrainState) -> bool:
  """Whether every parameter and optimizer-state value is finite (no NaN, no Inf)."""
  return bool(_all_finite(state))
