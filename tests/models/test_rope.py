"""Rotary embeddings with rope scaling: linear stretches positions, llama3 only the long wavelengths."""

import jax
import ml_collections
import numpy as np
import pytest

from lm import config as config_lib
from lm.models import Transformer, layers

ROPE_FIELDS = ("rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")


def _frequencies(tiny_config, **rope) -> np.ndarray:
  model = tiny_config("llama", {"model.embed_dim": 64, "model.rope_theta": 500.0, **{f"model.{k}": v for k, v in rope.items()}}).model
  return np.asarray(layers.rope_frequencies(ml_collections.FrozenConfigDict(model)))


def test_unscaled_frequencies_are_theta_to_the_minus_2i_over_d(tiny_config):
  head_dim = 16  # 64 / 4 heads
  expected = 500.0 ** -(np.arange(0, head_dim, 2) / head_dim)
  np.testing.assert_allclose(_frequencies(tiny_config), expected, rtol=1e-6)


def test_linear_scaling_is_positions_divided_by_the_factor(tiny_config):
  x_BTND = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
  positions_BT = np.arange(8)[None] * 4
  scaled = layers.apply_rotary(x_BTND, positions_BT, _frequencies(tiny_config, rope_scaling="linear", rope_scaling_factor=4.0))
  unscaled = layers.apply_rotary(x_BTND, positions_BT // 4, _frequencies(tiny_config))
  np.testing.assert_allclose(scaled, unscaled, atol=1e-5)
  assert not np.allclose(scaled, layers.apply_rotary(x_BTND, positions_BT, _frequencies(tiny_config)), atol=1e-2)


def test_llama3_scaling_keeps_short_wavelengths_and_divides_long_ones(tiny_config):
  rope = dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
              rope_original_max_seq_len=32)  # fmt: skip
  unscaled, scaled = _frequencies(tiny_config), _frequencies(tiny_config, **rope)
  wavelength = 2 * np.pi / unscaled  # 6.3, 13.6, 29.7, 64.6, ... positions
  short, long = wavelength < 32 / 4, wavelength > 32 / 1
  assert short.any() and long.any() and (~short & ~long).any()  # every regime is exercised
  np.testing.assert_array_equal(scaled[short], unscaled[short])
  np.testing.assert_allclose(scaled[long], unscaled[long] / 8.0, rtol=1e-6)
  between = ~short & ~long
  assert np.all((scaled[between] < unscaled[between]) & (scaled[between] > unscaled[between] / 8.0))


def test_llama3_frequencies_equal_transformers(tiny_config):
  transformers = pytest.importorskip("transformers")
  from transformers import modeling_rope_utils

  rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_theta=500.0, rope_scaling=rope)
  expected, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  ours = _frequencies(tiny_config, rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_seq_len=32)
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)


def test_a_config_saved_before_rope_scaling_existed_validates_and_runs_unscaled(tiny_config):
  config = tiny_config("llama")
  old = ml_collections.ConfigDict(config.to_dict())
  for field in ROPE_FIELDS:
    del old.model[field]
  config_lib.validate(old, num_devices=8)
  frequencies = layers.rope_frequencies(ml_collections.FrozenConfigDict(old.model))
  np.testing.assert_array_equal(frequencies, layers.rope_frequencies(ml_collections.FrozenConfigDict(config.model)))

  def parameter_shapes(model_config) -> list[tuple[int, ...]]:
    """Traces every layer (none may read a field the old config lacks), without compiling."""
    tokens = np.zeros((2, 16), np.int32)
    model = Transformer(ml_collections.FrozenConfigDict(model_config))
    return [leaf.shape for leaf in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0), tokens, tokens, tokens))]

  assert parameter_shapes(old.model) == parameter_shapes(config.model)
  config.model.rope_scaling = "linear"  # the fields are read: scaled, the frequencies change
  assert not np.allclose(frequencies, layers.rope_frequencies(ml_collections.FrozenConfigDict(config.model)))
