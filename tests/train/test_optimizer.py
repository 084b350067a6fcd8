"""Learning-rate schedules and the weight-decay mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lm.models import Transformer
from lm.train import optimizer


def _opt(tiny_config, **fields):
  config = tiny_config()
  config.optimizer.update({"learning_rate": 1.0, "warmup_steps": 10, "min_learning_rate_ratio": 0.1, **fields})
  return config.optimizer


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # step:        0    5    10   55 (halfway through the decay)   100 (end)
        ("cosine", [0.0, 0.5, 1.0, 0.55, 0.1]),
        ("linear", [0.0, 0.5, 1.0, 0.55, 0.1]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
        # wsd with decay_fraction 0.2: stable until step 80, then linear to 0.1 at 100
        ("wsd", [0.0, 0.5, 1.0, 1.0, 0.1]),
    ],
)
def test_schedules(tiny_config, schedule, expected):
  lr = optimizer.make_schedule(_opt(tiny_config, schedule=schedule, decay_fraction=0.2), total_steps=100)
  np.testing.assert_allclose([lr(step) for step in (0, 5, 10, 55, 100)], expected, atol=1e-6)


def test_wsd_decays_only_in_the_last_fraction(tiny_config):
  lr = optimizer.make_schedule(_opt(tiny_config, schedule="wsd", decay_fraction=0.2), total_steps=100)
  np.testing.assert_allclose([lr(80), lr(90)], [1.0, 0.55], atol=1e-6)


def _params(tiny_config, family):
  config = tiny_config(family, {"model.tie_embeddings": False})
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  tokens = jnp.zeros((1, 4), jnp.int32)
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, tokens, tokens)["params"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weight_decay_skips_norms_biases_and_embeddings(tiny_config, family):
  params = _params(tiny_config, family)
  mask = optimizer.weight_decay_mask(params, ("norm", "bias", "embedding"))
  decayed = {
      "/".join(str(k.key) for k in path)
      for path, decay in jax.tree_util.tree_leaves_with_path(mask)
      if decay
  }
  assert decayed and all(name.endswith("kernel") for name in decayed), decayed
  assert "lm_head/kernel" in decayed and "layers/attn/query/kernel" in decayed
  everything = optimizer.weight_decay_mask(params, ())
  assert all(jax.tree.leaves(everything))


def test_adamw_decays_exactly_the_masked_parameters(tiny_config):
  params = _params(tiny_config, "gpt2")
  opt = _opt(tiny_config, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0)
  tx, _ = optimizer.make(opt, total_steps=10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new_params = optax.apply_updates(params, updates)
  mask = optimizer.weight_decay_mask(params, tuple(opt.no_weight_decay))
  # With zero gradients the only change is decay: p <- p - lr * wd * p.
  jax.tree.map(
      lambda new, old, decay: np.testing.assert_allclose(new, old * (0.5 if decay else 1.0), rtol=1e-6),
      new_params,
      params,
      mask,
  )
