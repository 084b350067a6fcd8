"""The training step: loss arithmetic, gradient accumulation, and equal numbers on every mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.train import loop, step as step_lib


def test_token_losses_match_optax_and_hand_computed_z():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 11)) * 3
  targets = jax.random.randint(jax.random.key(1), (2, 3), 0, 11)
  cross_entropy, log_z = step_lib.token_losses(logits, targets)
  np.testing.assert_allclose(
      cross_entropy, optax.softmax_cross_entropy_with_integer_labels(logits, targets), rtol=1e-6
  )
  np.testing.assert_allclose(log_z, np.log(np.exp(np.asarray(logits, np.float64)).sum(-1)), rtol=1e-6)


def _run(config, num_steps, devices=None):
  """Losses of the first `num_steps` steps on `devices`, and the final state."""
  run = loop.setup(config, devices)
  state = run.init_state()
  losses = []
  for step, batch in zip(range(num_steps), run.train_batches()):
    state, metrics = run.train_step(state, batch, jax.random.fold_in(jax.random.key(0), step))
    losses.append(float(metrics["loss"]))
  return np.array(losses), state


def test_microbatches_equal_one_large_batch(tiny_config):
  whole = tiny_config("llama", {"mesh.data": 8, "data.batch_size": 32, "train.z_loss_weight": 1e-3})
  split = tiny_config("llama", {"mesh.data": 8, "data.batch_size": 32, "train.z_loss_weight": 1e-3, "train.microbatches": 4})
  whole_losses, whole_state = _run(whole, 2)
  split_losses, split_state = _run(split, 2)
  np.testing.assert_allclose(split_losses, whole_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), split_state.params, whole_state.params)


def test_weights_exclude_tokens_from_the_loss(tiny_config):
  config = tiny_config("gpt2", {"mesh.data": 8})
  run = loop.setup(config)
  batch = next(run.train_batches())
  weights = np.ones(batch["weights"].shape, np.float32)
  weights[:, 8:] = 0.0
  half = dict(batch, weights=jax.device_put(weights, batch["weights"].sharding))
  state = run.init_state()
  params = jax.tree.map(jnp.copy, state.params)  # the step donates its state
  _, metrics = run.train_step(state, half, jax.random.key(0))
  logits = run.model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
  cross_entropy, _ = step_lib.token_losses(logits, batch["targets"])
  np.testing.assert_allclose(metrics["loss"], np.mean(np.asarray(cross_entropy)[:, :8]), rtol=1e-5)
  assert float(metrics["tokens"]) == weights.sum()


MESHES = [  # (data, fsdp, tensor)
    (8, 1, 1),
    (1, 8, 1),
    (2, 2, 2),
    (1, 4, 2),
]


@pytest.fixture(scope="module")
def single_device_losses(tiny_config):
  config = tiny_config("llama", {"mesh.data": 1})
  losses, _ = _run(config, 5, devices=jax.devices()[:1])
  return losses


@pytest.mark.parametrize("data, fsdp, tensor", MESHES)
def test_sharded_training_equals_single_device(single_device_losses, tiny_config, data, fsdp, tensor):
  config = tiny_config("llama", {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
  losses, _ = _run(config, 5)
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)


def test_gpt2_sharded_training_equals_single_device(tiny_config):
  single, _ = _run(tiny_config("gpt2", {"mesh.data": 1}), 5, devices=jax.devices()[:1])
  sharded, _ = _run(tiny_config("gpt2", {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), 5)
  np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_sequence_parallel_training_equals_single_device(single_device_losses, tiny_config):
  config = tiny_config("llama", {"mesh.data": 2, "mesh.sequence": 2, "mesh.tensor": 2})
  losses, _ = _run(config, 5)
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
