"""Meshes from the config, and placing a process's rows into global arrays."""

import jax
import numpy as np

from lm import sharding


def test_make_mesh_uses_the_config_sizes(tiny_config):
  config = tiny_config("llama", {"mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 2})
  mesh = sharding.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"stage": 1, "data": 2, "fsdp": 2, "expert": 1, "tensor": 2, "sequence": 1}


def test_make_mesh_on_a_subset_of_devices(tiny_config):
  mesh = sharding.make_mesh(tiny_config("llama", {"mesh.data": 1, "mesh.fsdp": -1}).mesh, jax.devices()[:4])
  assert dict(mesh.shape) == {"stage": 1, "data": 1, "fsdp": 4, "expert": 1, "tensor": 1, "sequence": 1}
  assert set(mesh.devices.flat) == set(jax.devices()[:4])


def test_logical_rules_map_parameters_and_batches(tiny_config):
  config = tiny_config("llama", {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  assert sharding.logical_sharding(mesh, rules, ("embed", "mlp")).spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  batch_spec = sharding.logical_sharding(mesh, rules, sharding.BATCH_AXES).spec
  assert batch_spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), "sequence")


def test_process_rows_and_global_batch(tiny_config):
  config = tiny_config("llama", {"mesh.data": 4, "mesh.fsdp": 2})
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.logical_sharding(mesh, sharding.rules(config.mesh), sharding.BATCH_AXES)
  rows = sharding.process_rows(batch_sharding, (16, 3))
  np.testing.assert_array_equal(rows, np.arange(16))  # one process holds every row
  local = {"inputs": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  batch = sharding.global_batch_from_local(batch_sharding, local, 16)
  assert batch["inputs"].sharding == batch_sharding
  np.testing.assert_array_equal(batch["inputs"], local["inputs"])
