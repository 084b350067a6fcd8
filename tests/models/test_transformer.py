"""The Transformer: scan and remat change nothing numerically, packing keeps documents apart, dtypes hold."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm.models import Transformer, transformer

FAMILIES = ("llama", "gpt2")


def _model(config, **model_overrides) -> Transformer:
  model_config = ml_collections.ConfigDict(config.model)
  model_config.update(model_overrides)
  return Transformer(ml_collections.FrozenConfigDict(model_config))


def _inputs(batch=2, length=16, vocab=128, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)
  segment_ids = jnp.ones((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return tokens, segment_ids, positions


def _init(model, inputs, seed=0):
  return nn.unbox(jax.jit(model.init)(jax.random.key(seed), *inputs)["params"])


def _apply(model, params, *inputs):
  return jax.jit(model.apply)({"params": params}, *inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_layers_on_and_off_give_the_same_logits(tiny_config, family):
  config = tiny_config(family)
  inputs = _inputs()
  unscanned = _model(config, scan_layers=False)
  params = _init(unscanned, inputs)
  scanned_params = transformer.stack_layers(params, config.model.num_layers)
  logits = _apply(unscanned, params, *inputs)
  scanned_logits = _apply(_model(config, scan_layers=True), scanned_params, *inputs)
  np.testing.assert_allclose(logits, scanned_logits, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_policies_give_the_same_loss_and_gradients(tiny_config, scan_layers):
  config = tiny_config("llama")
  inputs = _inputs()
  reference = _model(config, scan_layers=scan_layers, remat_policy="none")
  params = _init(reference, inputs)

  def loss(model, params):
    return jnp.mean(model.apply({"params": params}, *inputs) ** 2)

  loss_and_grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  expected_loss, expected_grads = loss_and_grads(reference, params)
  for policy in transformer.REMAT_POLICIES:
    got_loss, got_grads = loss_and_grads(_model(config, scan_layers=scan_layers, remat_policy=policy), params)
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6, err_msg=policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, err_msg=policy), got_grads, expected_grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_equal_each_document_run_alone(tiny_config, family):
  config = tiny_config(family)
  model = _model(config)
  tokens, _, _ = _inputs(batch=1, length=16)
  boundary = 6
  segment_ids = jnp.array([[1] * boundary + [2] * (16 - boundary)])
  positions = jnp.array([list(range(boundary)) + list(range(16 - boundary))])
  params = _init(model, (tokens, segment_ids, positions))
  packed = _apply(model, params, tokens, segment_ids, positions)

  def alone(part):
    length = part.stop - part.start
    return _apply(model, params, tokens[:, part], jnp.ones((1, length), jnp.int32), jnp.arange(length)[None])

  np.testing.assert_allclose(packed[:, :boundary], alone(slice(0, boundary)), atol=1e-5)
  np.testing.assert_allclose(packed[:, boundary:], alone(slice(boundary, 16)), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_on_float32_params(tiny_config, family):
  config = tiny_config(family)
  inputs = _inputs()
  f32_model = _model(config, dtype="float32")
  params = _init(f32_model, inputs)
  bf16_logits = _apply(_model(config, dtype="bfloat16"), params, *inputs)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert bf16_logits.dtype == jnp.bfloat16
  f32_logits = _apply(f32_model, params, *inputs)
  np.testing.assert_allclose(bf16_logits.astype(jnp.float32), f32_logits, atol=0.05)


def test_parameters_carry_logical_axis_names(tiny_config):
  config = tiny_config("llama", {"model.tie_embeddings": False})
  abstract = jax.eval_shape(_model(config).init, jax.random.key(0), *_inputs())
  specs = nn.get_partition_spec(abstract)["params"]
  assert tuple(specs["token_embed"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["layers"]["attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
  assert tuple(specs["layers"]["attn"]["key"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
  assert tuple(specs["layers"]["attn"]["out"]["kernel"]) == ("layers", "heads", "head_dim", "embed")
  assert tuple(specs["layers"]["mlp"]["gate"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


@pytest.mark.parametrize(
    "family, expected_params",
    [
        # embed 128*32 + layers 2*(norms 2*32 + q,o 2*32*32 + k,v 2*32*16 + gate,up,down 3*32*64) + final norm 32
        ("llama", 128 * 32 + 2 * (2 * 32 + 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 32),
        # + positions 64*32; LayerNorms have biases; every projection has a bias; MLP has no gate
        (
            "gpt2",
            128 * 32
            + 64 * 32
            + 2 * (4 * 32 + 2 * (32 * 32 + 32) + 2 * (32 * 16 + 16) + (32 * 64 + 64) + (64 * 32 + 32))
            + 2 * 32,
        ),
    ],
)
def test_parameter_count(tiny_config, family, expected_params):
  params = _init(_model(tiny_config(family)), _inputs())
  assert sum(p.size for p in jax.tree.leaves(params)) == expected_params
