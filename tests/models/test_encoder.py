"""The BERT encoder: bidirectional within segments, scan and sharding change nothing, packing keeps segments apart."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import models, sharding
from lm.models import Encoder, transformer

B, T = 4, 16


def _model(config, **model_overrides) -> Encoder:
  model_config = ml_collections.ConfigDict(config.model)
  model_config.update(model_overrides)
  return models.get(model_config)


def _inputs(seed=0, vocab=128):
  tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)
  segment_ids = jnp.array([[1] * T, [1] * 10 + [0] * 6, [1] * 6 + [2] * 10, [1] * T])  # padding, packing
  positions = jnp.array([list(range(T))] * 2 + [list(range(6)) + list(range(10))] + [list(range(T))])
  return tokens, segment_ids, positions


@functools.partial(jax.jit, static_argnames=("model",))
def _init_params(inputs, *, model):
  return nn.unbox(model.init(jax.random.key(1), *inputs)["params"])


def _init(model, inputs):
  return _init_params(inputs, model=model)


@functools.partial(jax.jit, static_argnames=("model", "hidden_only"))
def _forward(params, inputs, *, model, hidden_only):
  return model.apply({"params": params}, *inputs, hidden_only=hidden_only)


def _apply(model, params, *inputs, hidden_only=False):
  """The module's logits (or final activations), compiled once per model and shape."""
  return _forward(params, inputs, model=model, hidden_only=hidden_only)


def test_models_get_builds_the_encoder(tiny_config):
  model = models.get(tiny_config("bert").model)
  assert isinstance(model, Encoder) and model.num_inputs == 3


def test_scan_layers_on_and_off_give_the_same_logits(tiny_config):
  config = tiny_config("bert")
  inputs = _inputs()
  unscanned = _model(config, scan_layers=False)
  params = _init(unscanned, inputs)
  scanned_params = transformer.stack_layers(params, config.model.num_layers)
  np.testing.assert_allclose(
      _apply(unscanned, params, *inputs), _apply(_model(config, scan_layers=True), scanned_params, *inputs), atol=1e-5
  )


def test_every_token_sees_later_tokens_of_its_segment_only(tiny_config):
  model = _model(tiny_config("bert"))
  tokens, segment_ids, positions = _inputs()
  params = _init(model, (tokens, segment_ids, positions))
  logits = _apply(model, params, tokens, segment_ids, positions)
  changed = _apply(model, params, tokens.at[2, 4].set((tokens[2, 4] + 1) % 128), segment_ids, positions)
  assert not np.allclose(changed[2, 0], logits[2, 0])  # an earlier token of the same segment: bidirectional
  np.testing.assert_allclose(changed[2, 6:], logits[2, 6:], atol=1e-6)  # the next segment: untouched


def test_packed_segments_equal_each_segment_alone(tiny_config):
  model = _model(tiny_config("bert"))
  tokens, segment_ids, positions = _inputs()
  params = _init(model, (tokens, segment_ids, positions))
  packed = _apply(model, params, tokens, segment_ids, positions)
  for part in (slice(0, 6), slice(6, T)):
    length = part.stop - part.start
    alone = _apply(model, params, tokens[2:3, part], jnp.ones((1, length), jnp.int32), jnp.arange(length)[None])
    np.testing.assert_allclose(packed[2:3, part], alone, atol=1e-5)
  padded_alone = _apply(model, params, tokens[1:2, :10], jnp.ones((1, 10), jnp.int32), jnp.arange(10)[None])
  np.testing.assert_allclose(packed[1:2, :10], padded_alone, atol=1e-5)  # right padding changes nothing


def test_output_logits_equal_the_modules_logits(tiny_config):
  model = _model(tiny_config("bert"))
  inputs = _inputs()
  params = _init(model, inputs)
  hidden = _apply(model, params, *inputs, hidden_only=True)
  assert hidden.shape == (B, T, model.cfg.embed_dim)
  np.testing.assert_allclose(model.output_logits(params, hidden), _apply(model, params, *inputs), atol=1e-5)


def test_sharded_equals_one_device(tiny_config):
  config = tiny_config("bert", {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
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
