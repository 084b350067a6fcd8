"""The Transformer: scan and remat change nothing numerically, packing keeps documents apart, dtypes hold."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm.models import Transformer, layers, transformer
from lm.objectives import causal_lm

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


def test_unrolled_scan_gives_the_same_logits_and_gradients(tiny_config):
  config = tiny_config("llama", {"model.num_layers": 3})
  inputs = _inputs()
  looped = _model(config, scan_unroll=1)
  params = _init(looped, inputs)

  def loss(model, params):
    return jnp.mean(model.apply({"params": params}, *inputs) ** 2)

  loss_and_grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  expected_loss, expected_grads = loss_and_grads(looped, params)
  for unroll in (2, 3):
    got_loss, got_grads = loss_and_grads(_model(config, scan_unroll=unroll), params)
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, expected_grads)


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


def test_fp8_rounds_to_the_format_under_a_per_tensor_scale():
  x = jax.random.normal(jax.random.key(0), (64, 32)) * 7.0
  for fp8_dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    rounded = layers.quantize_dequantize(x, fp8_dtype)
    scale = float(jnp.max(jnp.abs(x))) / float(jnp.finfo(fp8_dtype).max)
    in_format = np.asarray(rounded / scale)
    # Representable in the format, up to the float32 rounding of the division.
    np.testing.assert_allclose(in_format.astype(fp8_dtype).astype(np.float32), in_format, rtol=1e-6)
    assert not np.array_equal(rounded, x)
    mantissa_bits = jnp.finfo(fp8_dtype).nmant
    np.testing.assert_allclose(rounded, x, rtol=2.0**-mantissa_bits, atol=scale * 2.0**-6)


@pytest.mark.parametrize("special", [0.0, np.inf, np.nan])
def test_fp8_keeps_zeros_saturates_inf_and_propagates_nan(special):
  x = jnp.zeros((4, 8)) if special == 0.0 else jnp.ones((4, 8)).at[0, 0].set(special)
  rounded = np.asarray(layers.quantize_dequantize(x, jnp.float8_e4m3fn))
  if special == 0.0:
    np.testing.assert_array_equal(rounded, 0.0)
  elif np.isinf(special):
    assert rounded[0, 0] == float(jnp.finfo(jnp.float8_e4m3fn).max) and np.all(rounded.ravel()[1:] == 1.0)
  else:
    assert np.isnan(rounded[0, 0]) and np.all(rounded.ravel()[1:] == 1.0)


def test_fp8_leaves_the_output_layer_alone(tiny_config):
  """The module's untied head and the loss's output_logits agree with fp8 on: neither is quantized."""
  config = tiny_config("llama", {"model.tie_embeddings": False, "model.fp8_matmuls": True})
  model = _model(config)
  inputs = _inputs()
  params = _init(model, inputs)
  hidden = jax.jit(lambda params: model.apply({"params": params}, *inputs, hidden_only=True))(params)
  np.testing.assert_allclose(_apply(model, params, *inputs), transformer.output_logits(params, model.cfg, hidden), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_matmuls_stay_close_to_bfloat16(tiny_config, family):
  """Loss within 0.1% and gradients pointing the same way (cosine > 0.99): e4m3 forward, e5m2 gradients."""

  config = tiny_config(family, {"model.dtype": "bfloat16", "model.embed_dim": 64, "model.mlp_dim": 256})
  tokens, _, positions = _inputs(batch=4, length=32)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "positions": positions, "weights": jnp.ones((4, 32))}
  params = _init(_model(config), (tokens, None, positions))

  def loss_and_grads(fp8):
    model = _model(config, fp8_matmuls=fp8)
    loss = lambda params: causal_lm.CausalLM(None).loss_sums(params, model, batch, jax.random.key(0), 0.0)[0] / tokens.size
    loss_value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(loss_value), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

  bf16_loss, bf16_grads = loss_and_grads(False)
  fp8_loss, fp8_grads = loss_and_grads(True)
  assert fp8_loss != bf16_loss  # the fp8 path is taken
  assert abs(fp8_loss - bf16_loss) < 1e-3 * bf16_loss
  cosine = fp8_grads @ bf16_grads / np.linalg.norm(fp8_grads) / np.linalg.norm(bf16_grads)
  assert cosine > 0.99
