"""Mixture of experts: the routed block equals a dense reference, capacity drops what it says, the
load-balancing loss reaches the gradients, and expert-parallel training equals one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import metrics
from lm.models import Transformer, moe, transformer
from lm.objectives import causal_lm
from lm.train import loop

E, K = 4, 2


def _moe_config(tiny_config, overrides=None):
  return tiny_config("llama", {"model.num_experts": E, "model.experts_per_token": K, **(overrides or {})})


def _block_and_params(config, x_BTD):
  block = moe.MoeMlp(ml_collections.FrozenConfigDict(config.model))
  params = nn.unbox(block.init(jax.random.key(0), x_BTD)["params"])
  # A router with some spread, so top-k choices are not near ties, and experts of unit scale.
  scales = {"router": 50.0, "gate": 30.0, "up": 30.0, "down": 30.0}
  return block, {name: value * scales[name] for name, value in params.items()}


def _reference(params, x_BTD, k):
  """Every expert on every token, then the top-k mix: Mixtral's definition, written densely."""
  probs_BTE = jax.nn.softmax(x_BTD @ params["router"], axis=-1)
  top_BTK, experts_BTK = jax.lax.top_k(probs_BTE, k)
  gates_BTK = top_BTK / top_BTK.sum(-1, keepdims=True)
  hidden_BTEF = jax.nn.silu(jnp.einsum("btd,edf->btef", x_BTD, params["gate"])) * jnp.einsum("btd,edf->btef", x_BTD, params["up"])
  out_BTED = jnp.einsum("btef,efd->bted", hidden_BTEF, params["down"])
  weights_BTE = jnp.sum(jax.nn.one_hot(experts_BTK, probs_BTE.shape[-1]) * gates_BTK[..., None], axis=2)
  return jnp.einsum("bte,bted->btd", weights_BTE, out_BTED)


def test_dropless_block_equals_every_expert_mixed_by_the_router(tiny_config):
  config = _moe_config(tiny_config)
  x_BTD = jax.random.normal(jax.random.key(1), (2, 16, config.model.embed_dim))
  block, params = _block_and_params(config, x_BTD)
  out_BTD, state = block.apply({"params": params}, x_BTD, mutable=["intermediates"])
  expected_BTD = _reference(params, x_BTD, K)
  assert float(jnp.max(jnp.abs(expected_BTD))) > 0.1  # the experts contribute: the comparison can fail
  np.testing.assert_allclose(out_BTD, expected_BTD, rtol=1e-5, atol=1e-5)
  (stats,) = state["intermediates"]["router"]
  assert float(stats["dropped"]) == 0.0
  np.testing.assert_allclose(float(jnp.sum(stats["expert_load"])), 1.0, rtol=1e-6)


def test_capacity_keeps_the_first_choices_and_drops_the_rest(tiny_config):
  config = _moe_config(tiny_config, {"model.expert_capacity_factor": 0.5})
  x_BTD = jax.random.normal(jax.random.key(2), (2, 16, config.model.embed_dim))
  block, params = _block_and_params(config, x_BTD)
  slots = moe.capacity(block.cfg, 16)
  assert slots == 4  # 0.5 * 16 tokens * 2 choices / 4 experts
  logits_BTE = x_BTD @ params["router"]
  dispatch_BTEC, combine_BTEC, stats = moe.route(logits_BTE, K, slots)
  # Each expert's slots hold at most one choice each, and no expert takes more than its slots.
  assert float(jnp.max(jnp.sum(dispatch_BTEC, axis=1))) <= 1.0
  assert float(jnp.max(jnp.sum(dispatch_BTEC, axis=(1, 3)))) <= slots
  # Choices kept are exactly the first `slots` (in token order) that each expert received.
  _, experts_BTK = jax.lax.top_k(jax.nn.softmax(logits_BTE), K)
  for row in range(2):
    for expert in range(E):
      tokens = [t for t in range(16) for k in range(K) if int(experts_BTK[row, t, k]) == expert]
      kept = [t for t in range(16) if float(jnp.sum(dispatch_BTEC[row, t, expert])) > 0]
      assert kept == tokens[:slots]
  total_choices = 2 * 16 * K
  kept_choices = float(jnp.sum(dispatch_BTEC))
  np.testing.assert_allclose(float(stats["dropped"]), 1 - kept_choices / total_choices, rtol=1e-6)
  assert float(stats["dropped"]) > 0
  # Combine weights are the renormalized gates of the kept choices.
  assert float(jnp.max(jnp.sum(combine_BTEC, axis=(2, 3)))) <= 1.0 + 1e-6


def test_the_load_balancing_loss_is_switch_transformers_and_has_gradients(tiny_config):
  logits_BTE = jax.random.normal(jax.random.key(3), (2, 16, E)) * 3
  _, _, stats = moe.route(logits_BTE, K, 16)
  probs_NE = np.asarray(jax.nn.softmax(logits_BTE)).reshape(-1, E)
  top_NK = np.argsort(-probs_NE, axis=-1)[:, :K]
  share_KE = np.stack([np.bincount(top_NK[:, k], minlength=E) / len(top_NK) for k in range(K)])
  np.testing.assert_allclose(float(stats["aux_loss"]), E * np.sum(share_KE * probs_NE.mean(0)), rtol=1e-5)
  grad = jax.grad(lambda logits: moe.route(logits, K, 16)[2]["aux_loss"])(logits_BTE)
  assert float(jnp.max(jnp.abs(grad))) > 0  # through the router probabilities


def _train_losses(config, steps, devices=None):
  run = loop.setup(config, devices)
  state = run.init_state()
  rows = []
  for step, batch in zip(range(steps), run.train_batches()):
    state, step_metrics = run.train_step(state, batch, jax.random.fold_in(jax.random.key(0), step))
    rows.append({name: float(value) for name, value in step_metrics.items()})
  return rows


@pytest.fixture(scope="module")
def single_device_moe(tiny_config):
  return _train_losses(_moe_config(tiny_config, {"mesh.data": 1}), 5, jax.devices()[:1])


@pytest.mark.parametrize("mesh", [{"mesh.expert": 4, "mesh.data": 2}, {"mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.data": 1}])
def test_expert_parallel_training_equals_one_device(single_device_moe, tiny_config, mesh):
  rows = _train_losses(_moe_config(tiny_config, mesh), 5)
  for name in ("loss", "grad_norm", "router_aux_loss", "expert_load_max", "expert_load_min"):
    np.testing.assert_allclose([r[name] for r in rows], [r[name] for r in single_device_moe], rtol=2e-5, err_msg=name)
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert rows[0]["router_aux_loss"] >= K - 1e-4  # K when balanced, more otherwise
  assert rows[0]["expert_load_max"] >= 1.0 >= rows[0]["expert_load_min"]


def test_remat_changes_no_numbers(tiny_config, single_device_moe):
  rows = _train_losses(_moe_config(tiny_config, {"mesh.data": 1, "model.remat_policy": "full"}), 5, jax.devices()[:1])
  for name in ("loss", "grad_norm", "router_aux_loss", "expert_load_max"):
    np.testing.assert_allclose([r[name] for r in rows], [r[name] for r in single_device_moe], rtol=1e-5, err_msg=name)
  assert all(r["dropped_tokens"] == 0.0 for r in rows)


def test_scanned_and_unrolled_blocks_agree_with_their_router_statistics(tiny_config):
  config = _moe_config(tiny_config, {"model.num_layers": 3})
  tokens_BT = jax.random.randint(jax.random.key(6), (2, 16), 0, 128)
  inputs = (tokens_BT, jnp.ones_like(tokens_BT), jnp.broadcast_to(jnp.arange(16), (2, 16)))
  batch = {"inputs": tokens_BT, "segment_ids": inputs[1], "positions": inputs[2], "targets": tokens_BT, "weights": jnp.ones((2, 16))}
  results = []
  for scan_layers in (False, True):
    model = Transformer(ml_collections.FrozenConfigDict({**config.model, "scan_layers": scan_layers}))
    if not scan_layers:
      params = nn.unbox(model.init(jax.random.key(7), *inputs)["params"])
    loss, (_, _, router) = causal_lm.CausalLM(None).loss_sums(
        params if not scan_layers else transformer.stack_layers(params, 3), model, batch, None, 0.0
    )
    results.append((loss, router))
  (unrolled_loss, unrolled_router), (scanned_loss, scanned_router) = results
  np.testing.assert_allclose(scanned_loss, unrolled_loss, rtol=1e-5)
  for name, value in unrolled_router.items():
    np.testing.assert_allclose(scanned_router[name], value, rtol=1e-5, err_msg=name)


def test_the_router_loss_weight_reaches_the_gradients(tiny_config):
  config = _moe_config(tiny_config)
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  tokens_BT = jax.random.randint(jax.random.key(4), (2, 16), 0, 128)
  inputs = (tokens_BT, jnp.ones_like(tokens_BT), jnp.broadcast_to(jnp.arange(16), (2, 16)))
  params = nn.unbox(model.init(jax.random.key(5), *inputs)["params"])
  batch = {"inputs": tokens_BT, "segment_ids": inputs[1], "positions": inputs[2], "targets": tokens_BT, "weights": jnp.ones((2, 16))}

  def router_grads(weight):
    weighted = Transformer(ml_collections.FrozenConfigDict({**config.model, "router_aux_loss_weight": weight}))
    grads = jax.grad(lambda p: causal_lm.CausalLM(None).loss_sums(p, weighted, batch, None, 0.0)[0])(params)
    return grads["layers"]["mlp"]["router"]

  assert float(jnp.max(jnp.abs(router_grads(1.0) - router_grads(0.0)))) > 1e-4


def test_flops_count_the_active_experts(tiny_config):
  dense = tiny_config("llama").model
  sparse = _moe_config(tiny_config).model
  mlp = 3 * dense.embed_dim * dense.mlp_dim
  expected = metrics.matmul_params(dense) + dense.num_layers * ((K - 1) * mlp + dense.embed_dim * E)
  assert metrics.matmul_params(sparse) == expected
