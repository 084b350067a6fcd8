"""The training step: loss arithmetic, gradient accumulation, and equal numbers on every mesh."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lm.models import Transformer, layers
from lm.objectives import causal_lm
from lm.train import loop


def _model_and_params(config):
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  tokens_BT = jax.random.randint(jax.random.key(0), (4, 16), 0, config.model.vocab_size)
  segment_ids_BT = jnp.array([[1] * 5 + [2] * 11] * 4)
  positions_BT = jnp.array([list(range(5)) + list(range(11))] * 4)
  params = nn.unbox(model.init(jax.random.key(1), tokens_BT, segment_ids_BT, positions_BT)["params"])
  return model, params, (tokens_BT, segment_ids_BT, positions_BT)


@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("chunk_len", [0, 1, 5])  # of 16 positions: 0 is one chunk, 5 becomes chunks of 4
def test_chunked_losses_and_gradients_equal_those_of_whole_logits(tiny_config, tie_embeddings, chunk_len):
  config = tiny_config("gpt2", {"model.tie_embeddings": tie_embeddings, "model.loss_chunk_len": chunk_len})
  model, params, inputs = _model_and_params(config)
  targets_BT = jax.random.randint(jax.random.key(2), (4, 16), 0, config.model.vocab_size)
  weights_BT = jax.random.uniform(jax.random.key(3), (4, 16))

  def chunked(params):
    hidden_BTD = model.apply({"params": params}, *inputs, hidden_only=True)
    cross_entropy_BT, log_z_BT = causal_lm.token_losses(model, params, hidden_BTD, targets_BT)
    return jnp.sum((cross_entropy_BT + 0.1 * log_z_BT**2) * weights_BT)

  def whole(params):
    logits_BTV = model.apply({"params": params}, *inputs).astype(jnp.float32)
    cross_entropy_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    return jnp.sum((cross_entropy_BT + 0.1 * log_z_BT**2) * weights_BT)

  chunked_loss, chunked_grads = jax.jit(jax.value_and_grad(chunked))(params)
  whole_loss, whole_grads = jax.jit(jax.value_and_grad(whole))(params)
  np.testing.assert_allclose(chunked_loss, whole_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chunked_grads, whole_grads)


def test_the_logits_backward_multiplies_in_the_compute_dtype():
  """logits_einsum: float32 logits forward; backward products in the operands' dtype (not promoted to
  float32 by the float32 cotangent), within bfloat16 rounding of the float32 gradients."""
  x_f32 = jax.random.normal(jax.random.key(0), (2, 8, 16))
  w_f32 = jax.random.normal(jax.random.key(1), (32, 16))
  cotangent_f32 = jax.random.normal(jax.random.key(2), (2, 8, 32))

  def grads(einsum, x, w):
    logits, vjp = jax.vjp(lambda x, w: einsum("btd,vd->btv", x, w), x, w)
    return logits, vjp(cotangent_f32)

  reference = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  for got, expected in zip(jax.tree.leaves(grads(layers.logits_einsum, x_f32, w_f32)), jax.tree.leaves(grads(reference, x_f32, w_f32))):
    np.testing.assert_allclose(got, expected, rtol=1e-6)

  x_bf16, w_bf16 = x_f32.astype(jnp.bfloat16), w_f32.astype(jnp.bfloat16)
  logits, (dx, dw) = grads(layers.logits_einsum, x_bf16, w_bf16)
  assert logits.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16
  _, (expected_dx, expected_dw) = grads(reference, x_f32, w_f32)
  np.testing.assert_allclose(dx.astype(jnp.float32), expected_dx, rtol=0.05, atol=0.1)
  np.testing.assert_allclose(dw.astype(jnp.float32), expected_dw, rtol=0.05, atol=0.1)
  for einsum, expected_dtypes in ((layers.logits_einsum, {"bfloat16"}), (reference, {"bfloat16", "float32"})):
    backward = jax.make_jaxpr(lambda x, w: grads(einsum, x, w)[1])(x_bf16, w_bf16)
    dot_operands = [var.aval.dtype.name for eqn in _equations(backward.jaxpr) if eqn.primitive.name == "dot_general" for var in eqn.invars]
    assert set(dot_operands) == expected_dtypes  # autodiff's own backward (the reference) multiplies in float32


def _equations(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (custom_vjp, pjit) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _equations(inner)


def test_log_z_is_the_log_partition_function(tiny_config):
  model, params, inputs = _model_and_params(tiny_config("llama", {"model.loss_chunk_len": 4}))
  hidden_BTD = model.apply({"params": params}, *inputs, hidden_only=True)
  _, log_z_BT = causal_lm.token_losses(model, params, hidden_BTD, jnp.zeros((4, 16), jnp.int32))
  logits_BTV = np.asarray(model.apply({"params": params}, *inputs), np.float64)
  np.testing.assert_allclose(log_z_BT, np.log(np.exp(logits_BTV).sum(-1)), rtol=1e-6)


def _train_step_temp_bytes(config) -> int:
  run = loop.setup(config, jax.devices()[:1])
  batch_BT = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32)
  batch = {"inputs": batch_BT, "targets": batch_BT, "positions": batch_BT, "weights": jax.ShapeDtypeStruct(batch_BT.shape, jnp.float32)}
  compiled = run.train_step.lower(run.abstract_state, batch, jax.random.key(0)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_the_train_step_never_holds_the_whole_logits(tiny_config):
  """Compiled, the step's scratch memory stays below one float32 copy of the [B, T, V] logits."""
  overrides = {"mesh.data": 1, "model.vocab_size": 32768, "data.seq_len": 256, "model.max_seq_len": 256}
  config = tiny_config("llama", {**overrides, "model.loss_chunk_len": 32})
  logits_bytes = config.data.batch_size * config.data.seq_len * config.model.vocab_size * 4
  chunked_bytes = _train_step_temp_bytes(config)
  whole_bytes = _train_step_temp_bytes(tiny_config("llama", {**overrides, "model.loss_chunk_len": 0}))
  assert whole_bytes > logits_bytes, (whole_bytes, logits_bytes)  # the test can tell: unchunked, the logits are there
  assert chunked_bytes < logits_bytes / 2, (chunked_bytes, whole_bytes, logits_bytes)


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
  logits = run.model.apply({"params": params}, batch["inputs"], batch.get("segment_ids"), batch["positions"])
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
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
