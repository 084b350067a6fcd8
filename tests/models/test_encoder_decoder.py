"""T5: scan and sharding change nothing, packed segments stay apart, decoding with the cache equals teacher forcing."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import models, sharding
from lm.models import EncoderDecoder, encoder_decoder, transformer

B, S, T = 4, 16, 12  # rows, encoder length, decoder length


def _config(tiny_config, overrides: dict | None = None):
  """The tiny T5: untied output layer, three decoder blocks to the encoder's two, weights large enough that
  attention is far from uniform (so a wrong mask shows)."""
  defaults = {"model.tie_embeddings": False, "model.num_decoder_layers": 3, "model.init_std": 0.2}
  return tiny_config("t5", {**defaults, **(overrides or {})})


def _model(config, **model_overrides) -> EncoderDecoder:
  model_config = ml_collections.ConfigDict(config.model)
  model_config.update(model_overrides)
  return models.get(model_config)


def _positions(*lengths):
  return sum((list(range(length)) for length in lengths), [])


def _inputs(seed=0, vocab=128):
  """Encoder rows: whole, right-padded, two packed segments, whole; decoder rows: whole, whole, the two
  segments matching the encoder's, whole."""
  encoder_tokens = jax.random.randint(jax.random.key(seed), (B, S), 0, vocab)
  encoder_segment_ids = jnp.array([[1] * S, [1] * 10 + [0] * 6, [1] * 6 + [2] * 10, [1] * S])
  encoder_positions = jnp.array([_positions(S)] * 2 + [_positions(6, 10), _positions(S)])
  tokens = jax.random.randint(jax.random.key(seed + 1), (B, T), 0, vocab)
  segment_ids = jnp.array([[1] * T, [1] * T, [1] * 5 + [2] * 7, [1] * T])
  positions = jnp.array([_positions(T)] * 2 + [_positions(5, 7), _positions(T)])
  return encoder_tokens, encoder_segment_ids, encoder_positions, tokens, segment_ids, positions


@functools.partial(jax.jit, static_argnames=("model",))
def _init_params(inputs, *, model):
  return nn.unbox(model.init(jax.random.key(1), *inputs)["params"])


def _init(model, inputs):
  return _init_params(inputs, model=model)


@functools.partial(jax.jit, static_argnames=("model", "hidden_only"))
def _forward(params, inputs, *, model, hidden_only):
  return model.apply({"params": params}, *inputs, hidden_only=hidden_only)


def _apply(model, params, *inputs, hidden_only=False):
  """The decoder's logits (or final activations), compiled once per model and shape."""
  return _forward(params, inputs, model=model, hidden_only=hidden_only)


def test_models_get_builds_the_encoder_decoder(tiny_config):
  model = models.get(_config(tiny_config).model)
  assert isinstance(model, EncoderDecoder) and model.num_inputs == 6


def test_scan_layers_on_and_off_give_the_same_logits(tiny_config):
  config = _config(tiny_config)
  inputs = _inputs()
  unscanned = _model(config, scan_layers=False)
  params = _init(unscanned, inputs)
  scanned_params = transformer.stack_layers(params, config.model.num_layers)  # encoder's 2 and decoder's 3 blocks
  scanned = _model(config, scan_layers=True)
  expected_shapes = jax.tree.map(np.shape, jax.eval_shape(lambda: _init(scanned, inputs)))
  assert jax.tree.map(np.shape, scanned_params) == expected_shapes
  np.testing.assert_allclose(_apply(unscanned, params, *inputs), _apply(scanned, scanned_params, *inputs), atol=1e-5)


def test_parameter_shapes_of_any_family(tiny_config):
  shapes = transformer.parameter_shapes(_config(tiny_config).model, scan_layers=True)
  assert shapes["decoder"]["layers"]["cross_attn"]["key"]["kernel"] == (3, 32, 2, 8)
  assert shapes["encoder"]["relative_bias"] == (32, 4)
  assert "layers_1" in transformer.parameter_shapes(tiny_config("bert").model, scan_layers=False)


def test_packed_segments_equal_each_segment_alone(tiny_config):
  """Encoder segment m and decoder segment m of a row are one example: the same logits as that example alone."""
  model = _model(_config(tiny_config))
  inputs = _inputs()
  params = _init(model, inputs)
  packed = _apply(model, params, *inputs)
  encoder_tokens, tokens = inputs[0], inputs[3]

  def alone(encoder_part, part):
    source, target = encoder_tokens[2:3, encoder_part], tokens[2:3, part]
    ones = lambda x: jnp.ones_like(x)
    arange = lambda x: jnp.arange(x.shape[1])[None]
    return _apply(model, params, source, ones(source), arange(source), target, ones(target), arange(target))

  np.testing.assert_allclose(packed[2:3, :5], alone(slice(0, 6), slice(0, 5)), atol=1e-5)
  np.testing.assert_allclose(packed[2:3, 5:], alone(slice(6, S), slice(5, T)), atol=1e-5)


def test_decoder_segment_ids_of_none_still_skip_the_encoders_padding(tiny_config):
  """None is one segment per decoder row; cross-attention still masks the encoder's padding (segment 0)."""
  model = _model(_config(tiny_config))
  inputs = _inputs()
  params = _init(model, inputs)
  whole_rows = np.array([0, 1, 3])  # row 1's encoder input is right-padded
  expected = _apply(model, params, *inputs)[whole_rows]
  np.testing.assert_allclose(_apply(model, params, *inputs[:4], None, inputs[5])[whole_rows], expected, atol=1e-5)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_output_logits_equal_the_modules_logits(tiny_config, tie_embeddings):
  model = _model(_config(tiny_config, {"model.tie_embeddings": tie_embeddings}))
  inputs = _inputs()
  params = _init(model, inputs)
  assert ("lm_head" in params) != tie_embeddings
  hidden = _apply(model, params, *inputs, hidden_only=True)
  assert hidden.shape == (B, T, model.cfg.embed_dim)
  np.testing.assert_allclose(model.output_logits(params, hidden), _apply(model, params, *inputs), atol=1e-5)


@pytest.mark.parametrize("mesh_sizes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2}])
def test_sharded_equals_one_device(tiny_config, mesh_sizes):
  # At the usual init scale: float32 sums in another order differ by about 1e-5 of the logits' size.
  config = _config(tiny_config, {"model.init_std": 0.02, **{f"mesh.{axis}": size for axis, size in mesh_sizes.items()}})
  model = _model(config)
  inputs = _inputs()
  params = _init(model, inputs)
  expected = _apply(model, params, *inputs)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  sharded_params = jax.device_put(params, sharding.shardings_of(sharding.abstract_params(model, mesh, rules)))
  with sharding.activate(mesh, rules):
    got = _apply(model, sharded_params, *inputs)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(got, expected, atol=1e-5)


def _cache_leaves(cache, name: str) -> list:
  """Every leaf of the cache called `name`, in tree order."""
  return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0] if path[-1].key == name]


@pytest.mark.parametrize("prefill_length, scan_layers", [(1, True), (3, False)])
def test_decoding_with_the_cache_equals_teacher_forcing(tiny_config, prefill_length, scan_layers):
  """A first call with the encoder's output and `prefill_length` tokens, then one token per call with no
  encoder output: the logits of one full forward pass, and cross-attention's keys computed once."""
  model = _model(_config(tiny_config), scan_layers=scan_layers)
  encoder_tokens, encoder_segment_ids, encoder_positions, tokens, _, _ = _inputs(3)
  ones, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(T), (B, T))
  inputs = (encoder_tokens, encoder_segment_ids, jnp.broadcast_to(jnp.arange(S), (B, S)), tokens, ones, positions)
  params = _init(model, inputs)
  full = _apply(model, params, *inputs)

  def first_call(params, cache, encoded, tokens, positions):
    return model.apply(
        {"params": params, "cache": cache}, encoded, encoder_segment_ids, tokens, jnp.ones_like(tokens), positions,
        decode=True, method="decode_with", mutable=["cache"],
    )  # fmt: skip

  @jax.jit
  def step(params, cache, tokens, positions):
    return model.apply(
        {"params": params, "cache": cache}, None, None, tokens, jnp.ones_like(tokens), positions,
        decode=True, method="decode_with", mutable=["cache"],
    )  # fmt: skip

  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, decode=True)["cache"])
  cache = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
  encoded = jax.jit(lambda params: model.apply({"params": params}, *inputs[:3], method="encode"))(params)
  logits, variables = jax.jit(first_call)(params, cache, encoded, tokens[:, :prefill_length], positions[:, :prefill_length])
  np.testing.assert_allclose(logits, full[:, :prefill_length], atol=1e-5)
  cache = variables["cache"]
  source_keys = _cache_leaves(cache, "source_key")
  assert len(source_keys) == (1 if scan_layers else 3)
  if scan_layers:  # the encoder's output through each decoder block's cross-attention key projection
    kernel = params["decoder"]["layers"]["cross_attn"]["key"]["kernel"]
    np.testing.assert_allclose(source_keys[0], jnp.einsum("bsd,ldkh->lbskh", encoded, kernel), atol=1e-5)
  for t in range(prefill_length, T):
    logits, variables = step(params, cache, tokens[:, t : t + 1], positions[:, t : t + 1])
    cache = variables["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")
  for before, after in zip(source_keys, _cache_leaves(cache, "source_key")):
    np.testing.assert_array_equal(before, after)  # read, never recomputed


def test_cross_attention_without_the_encoders_output_needs_a_filled_cache(tiny_config):
  model = _model(_config(tiny_config))
  inputs = _inputs()
  params = _init(model, inputs)
  with pytest.raises(ValueError, match="cross-attention needs the encoder's output"):
    model.apply({"params": params}, None, None, *inputs[3:], method="decode_with")


@pytest.mark.parametrize(
    "bidirectional, relative_to_bucket",
    [
        # 16 buckets a direction (keys after the query from 16 on), 8 exact, then logarithmic up to 128.
        (True, {0: 0, -1: 1, -7: 7, -8: 8, -16: 10, -127: 15, -128: 15, -1000: 15, 1: 17, 16: 26, 300: 31}),
        # 32 buckets for keys before the query, 16 exact; keys after it share bucket 0.
        (False, {5: 0, 0: 0, -1: 1, -15: 15, -16: 16, -32: 21, -64: 26, -127: 31, -1000: 31}),
    ],
)
def test_relative_position_buckets_are_t5s(bidirectional, relative_to_bucket):
  """T5's buckets for 32 buckets and a max distance of 128, worked out from its formula (transformers'
  _relative_position_bucket): 16 + floor(log(distance / 16) / log(128 / 16) * 16), and likewise per direction."""
  relative = jnp.array([list(relative_to_bucket)])
  buckets = encoder_decoder.relative_position_buckets(relative, bidirectional, 32, 128)
  assert dict(zip(relative_to_bucket, np.asarray(buckets)[0].tolist())) == relative_to_bucket
