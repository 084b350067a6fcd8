"""Pipeline parallelism: stages over the mesh's stage axis give the unpipelined losses, and checkpoints move
between stage counts."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from lm.config import ConfigError
from lm.models import pipeline
from lm.train import loop


def _config(tiny_config, **overrides):
  # 4 layers so that 4 stages hold one each; 32 rows so that 2 x stages microbatches split every mesh.
  base = {"model.num_layers": 4, "data.batch_size": 32, "mesh.data": 1}
  return tiny_config("llama", {**base, **overrides})


def _losses(config, steps=4, devices=None):
  run = loop.setup(config, devices)
  state = run.init_state()
  losses = []
  for step, batch in zip(range(steps), run.train_batches()):
    state, metrics = run.train_step(state, batch, jax.random.fold_in(jax.random.key(0), step))
    losses.append(float(metrics["loss"]))
  return np.array(losses)


@pytest.fixture(scope="module")
def unpipelined(tiny_config):
  return _losses(_config(tiny_config), devices=jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh",
    [
        {"mesh.stage": 2, "mesh.data": 4},
        {"mesh.stage": 4, "mesh.data": 2, "model.pipeline_microbatches": 4},
        {"mesh.stage": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.remat_policy": "full"},
    ],
)
def test_pipelined_losses_equal_the_unpipelined_run(unpipelined, tiny_config, mesh, monkeypatch):
  ticks = []
  original = pipeline.run
  monkeypatch.setattr(pipeline, "run", lambda *args: ticks.append(args[-2:]) or original(*args))
  losses = _losses(_config(tiny_config, **mesh))
  assert ticks and ticks[0] == (mesh["mesh.stage"], mesh.get("model.pipeline_microbatches", 2 * mesh["mesh.stage"]))
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(losses, unpipelined, rtol=1e-5)


def test_stages_run_on_their_own_devices_and_hand_activations_on(tiny_config):
  run = loop.setup(_config(tiny_config, **{"mesh.stage": 2, "mesh.data": 4}))
  state = run.init_state()
  layers_sharding = state.params["layers"]["mlp"]["up"]["kernel"].sharding
  assert layers_sharding.spec[0] == "stage"  # stage s holds layers s * L/S ...: the checkpoint's layout
  hlo = run.train_step.lower(state, next(run.train_batches()), jax.random.key(0)).compile().as_text()
  assert "collective-permute" in hlo


def test_bubble_fraction():
  assert pipeline.bubble_fraction(1, 8) == 0
  assert pipeline.bubble_fraction(4, 8) == pytest.approx(3 / 11)
  assert pipeline.bubble_fraction(2, 4) == pytest.approx(1 / 5)


def test_a_checkpoint_moves_between_stage_counts(tiny_config, tmp_path):
  def config(steps, stages):
    mesh = {"mesh.stage": stages, "mesh.data": 8 // stages}
    return _config(tiny_config, **{"train.steps": steps, "train.log_every": 1, "checkpoint.every": 2, **mesh})

  def losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
      return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}

  loop.train(config(4, 1), str(tmp_path / "straight"))
  loop.train(config(2, 4), str(tmp_path / "four_stages"))
  shutil.copytree(tmp_path / "four_stages", tmp_path / "then_one")
  loop.train(config(4, 2), str(tmp_path / "four_stages"))  # saved with 4 stages, resumed with 2
  loop.train(config(4, 1), str(tmp_path / "then_one"))  # and with none
  expected = losses(tmp_path / "straight")
  for resumed in ("four_stages", "then_one"):
    got = losses(tmp_path / resumed)
    np.testing.assert_allclose([got[3], got[4]], [expected[3], expected[4]], rtol=1e-5, err_msg=resumed)
  assert os.path.isdir(tmp_path / "then_one")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"mesh.stage": 2, "mesh.data": 4, "model.scan_layers": False}, "mesh.stage"),
        ({"mesh.stage": 8, "model.num_layers": 4}, "mesh.stage"),
        ({"mesh.stage": 2, "mesh.data": 4, "model.num_experts": 4}, "mesh.stage"),
        ({"mesh.stage": 2, "mesh.data": 4, "model.pipeline_microbatches": 3}, "model.pipeline_microbatches"),
    ],
)
def test_configs_a_pipeline_cannot_run_are_one_line_errors(tiny_config, overrides, field):
  with pytest.raises(ConfigError, match=f"^{field}: "):
    loop.setup(_config(tiny_config, **overrides))
