"""The device mesh from the config, logical axis rules, and helpers to place arrays on the mesh."""

import contextlib
import math
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm import config as config_lib

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

BATCH_AXES = ("activation_batch", "activation_length")  # logical axes of every [B, T] batch array


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh of the axes mesh.axes declares; across slices the dcn sizes multiply in."""
  devices = list(jax.devices() if devices is None else devices)
  axes = config_lib.mesh_axes(mesh_config)
  ici, dcn = config_lib.mesh_shape(mesh_config, len(devices))
  ici_shape = [ici[axis] for axis in axes]
  dcn_shape = [dcn[axis] for axis in axes]
  if math.prod(dcn_shape) == 1:
    device_array = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  else:
    # TPU devices know their slice; elsewhere (GPU clusters, CPU rehearsals) each process is one.
    process_is_granule = devices[0].platform != "tpu"
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=process_is_granule, allow_split_physical_axes=True
    )
  return Mesh(device_array, axes)


def rules(mesh_config: ml_collections.ConfigDict) -> Rules:
  """The config's logical axis rules as a tuple of (logical name, mesh axes) pairs."""
  return tuple(
      (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in mesh_config.logical_axis_rules
  )


def data_parallel(mesh: Mesh, axis_rules: Rules) -> int:
  """How many ways a batch splits: the product of the mesh axes the rules map "activation_batch" to."""
  mapped = dict(axis_rules).get("activation_batch")
  axes = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
  return math.prod(mesh.shape[axis] for axis in axes)


# The config field that sets the size of a parameter dimension with this logical name.
FIELD_OF_LOGICAL_AXIS = {
    "vocab": "model.vocab_size",
    "embed": "model.embed_dim",
    "mlp": "model.mlp_dim",
    "heads": "model.num_heads",
    "kv_heads": "model.num_kv_heads",
    "expert": "model.num_experts",
}


def check_divisible(name: str, shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, axis_rules: Rules) -> None:
  """Raises ConfigError, naming the config field, if a dimension of array `name` cannot be split evenly
  over the mesh axes its logical name maps to (jit would fail later, deep inside, with a traceback)."""
  mesh_axes_per_dim = nn.logical_to_mesh_axes(PartitionSpec(*logical_axes), axis_rules)
  for size, logical_axis, mesh_axes in zip(shape, logical_axes, mesh_axes_per_dim):
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    num_devices = math.prod(mesh.shape[axis] for axis in mesh_axes)
    if size % num_devices:
      field = FIELD_OF_LOGICAL_AXIS.get(logical_axis, "mesh.logical_axis_rules")
      split = " x ".join(f"mesh.{axis}={mesh.shape[axis]}" for axis in mesh_axes)
      raise config_lib.ConfigError(
          f"{field}: {name} has {size} entries along {logical_axis!r}, which cannot be split over {split}; "
          f"make it a multiple of {num_devices}, or change the mesh"
      )


def logical_sharding(mesh: Mesh, axis_rules: Rules, logical_axes: Sequence[str | None]) -> NamedSharding:
  """The NamedSharding of an array whose dimensions have these logical names."""
  return nn.logical_to_mesh_sharding(PartitionSpec(*logical_axes), mesh, axis_rules)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that puts a full copy on every device (scalars, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, axis_rules: Rules) -> Iterator[None]:
  """Makes the mesh and rules current so nn.with_logical_constraint inside models takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    yield


class MeshJit:
  """A jitted function traced and run with the mesh and rules active.

  jax.set_mesh may only be entered outside jit, so the context wraps each call rather than the body.
  """

  def __init__(self, jitted: Callable, mesh: Mesh, axis_rules: Rules):
    self.jitted, self.mesh, self.axis_rules = jitted, mesh, axis_rules

  def __call__(self, *args):
    with activate(self.mesh, self.axis_rules):
      return self.jitted(*args)

  def lower(self, *args) -> jax.stages.Lowered:
    """Lowers for these arguments, for ahead-of-time compilation and compile-time measurements."""
    with activate(self.mesh, self.axis_rules):
      return self.jitted.lower(*args)


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> np.ndarray:
  """The indices [R] of the rows of a global [B, ...] array that this process's devices hold, in order.

  They need not be one block: with mesh.dcn_fsdp, say, a process holds every other group of rows.
  """
  index_map = sharding.addressable_devices_indices_map(global_shape)
  row_slices = {index[0].indices(global_shape[0]) for index in index_map.values()}  # replicas hold the same rows
  return np.concatenate([np.arange(start, stop) for start, stop, _ in sorted(row_slices)])


def global_batch_from_local(sharding: NamedSharding, local_rows: dict[str, np.ndarray], global_batch: int) -> dict:
  """Assembles global jax.Arrays from this process's rows (those `process_rows` lists, in its order)."""
  return {
      name: jax.make_array_from_process_local_data(sharding, rows, (global_batch,) + rows.shape[1:])
      for name, rows in local_rows.items()
  }


def init_params_boxed(model: nn.Module, rng: jax.Array):
  """A model's initial parameters, still wrapped in their logical-axis metadata."""
  tokens_BT = jnp.zeros((1, 1), jnp.int32)
  return model.init(rng, *[tokens_BT] * model.num_inputs)["params"]


def abstract_tree(init_boxed: Callable, mesh: Mesh, axis_rules: Rules):
  """Shapes and dtypes of init_boxed(rng)'s result, each leaf carrying the NamedSharding of its logical axes."""
  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  logical_specs = nn.get_partition_spec(boxed)
  jax.tree_util.tree_map_with_path(
      lambda path, leaf, spec: check_divisible(jax.tree_util.keystr(path, simple=True, separator="/"), leaf.shape, spec, mesh, axis_rules),
      nn.unbox(boxed),
      logical_specs,
  )
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, axis_rules)
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), nn.unbox(boxed), shardings)


def abstract_params(model: nn.Module, mesh: Mesh, axis_rules: Rules):
  """A model's parameters: shapes, dtypes and shardings, without computing anything."""
  return abstract_tree(lambda rng: init_params_boxed(model, rng), mesh, axis_rules)


def shardings_of(abstract):
  """The NamedSharding of every leaf of an abstract tree (parameters, or a whole TrainState)."""
  return jax.tree.map(lambda leaf: leaf.sharding, abstract)
