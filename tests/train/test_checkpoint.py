"""Checkpoints: kill -9 at any moment and rerun, preemption, another mesh, NaN steps, init_from."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm.config import ConfigError, UserError
from lm.train import checkpoint, loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  for line in open(path):
    try:
      rows.append(json.loads(line))
    except ValueError:  # a line being written right now
      pass
  return rows


def _cli(workdir, corpus_dir, data_dir, *overrides):
  """The lm.train command on a tiny model over the test corpus, logging and checkpointing often."""
  return [
      sys.executable, "-m", "lm.train", "--config=configs/quickstart.py", f"--workdir={workdir}",
      f"--config.data.source=text:{corpus_dir}", f"--config.data.data_dir={data_dir}",
      "--config.data.tokenizer_vocab_size=300", "--config.data.seq_len=32", "--config.data.batch_size=8",
      "--config.model.num_layers=2", "--config.model.embed_dim=32", "--config.model.mlp_dim=64",
      "--config.train.log_every=1", "--config.checkpoint.every=4", "--config.checkpoint.keep=2",
      *overrides,
  ]  # fmt: skip


def _saving(workdir) -> bool:
  """Whether Orbax is writing a checkpoint right now (its temporary directory exists)."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any("tmp" in name for name in os.listdir(directory))


def test_kill_9_at_any_moment_then_rerun_equals_the_uninterrupted_run(corpus_dir, tmp_path):
  steps = 40
  data_dir = tmp_path / "data"
  reference = tmp_path / "reference"
  subprocess.run(_cli(reference, corpus_dir, data_dir, f"--config.train.steps={steps}"), cwd=REPO, check=True,
                 capture_output=True, timeout=900)  # fmt: skip
  expected = _rows(reference)
  assert [row["step"] for row in expected] == list(range(1, steps + 1))

  workdir = tmp_path / "killed"
  command = _cli(workdir, corpus_dir, data_dir, f"--config.train.steps={steps}")
  rng = np.random.default_rng(0)
  kills = []
  for attempt in range(5):
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = max([row["step"] for row in _rows(workdir)], default=0)
    target = start + int(rng.integers(2, 8))
    during_save = attempt % 2 == 1  # every other kill lands while a checkpoint is being written
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
      logged = max([row["step"] for row in _rows(workdir)], default=0)
      if (during_save and logged > start and _saving(workdir)) or (not during_save and logged >= target):
        break
      time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kills.append((max([row["step"] for row in _rows(workdir)], default=0), during_save and _saving(workdir)))
  assert any(step < steps for step, _ in kills), kills
  assert any(during_save for _, during_save in kills), kills

  finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert finished.returncode == 0, finished.stderr
  got = _rows(workdir)
  assert [row["step"] for row in got] == list(range(1, steps + 1)), "every step logged exactly once"
  for got_row, expected_row in zip(got, expected):
    assert got_row["loss"] == expected_row["loss"], (got_row, expected_row, kills)  # bit for bit
    assert got_row["grad_norm"] == expected_row["grad_norm"]


def test_sigterm_saves_the_current_step_and_exits(corpus_dir, tmp_path, tiny_config):
  workdir = tmp_path / "run"
  command = _cli(workdir, corpus_dir, tmp_path / "data", "--config.train.steps=100000", "--config.checkpoint.every=0")
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while len(_rows(workdir)) < 5 and time.time() < deadline:
    time.sleep(0.01)
  process.send_signal(signal.SIGTERM)
  signalled_at = time.time()
  _, stderr = process.communicate(timeout=600)
  assert process.returncode != 0
  assert "Stopped by SIGTERM" in stderr and "Rerun the same command to resume" in stderr
  rows = _rows(workdir)
  saved = checkpoint.manager(str(workdir), tiny_config().checkpoint).latest_step()
  assert saved == rows[-1]["step"] >= 5  # the step it was on, logged and saved
  step_seconds = rows[-1]["seconds_per_step"]
  assert time.time() - signalled_at < 30 + 2 * step_seconds


def _train(config, workdir):
  loop.train(config, str(workdir))
  return {row["step"]: row for row in _rows(workdir)}


def test_a_checkpoint_restores_onto_another_mesh(tiny_config, tmp_path):
  def config(steps, **mesh):
    overrides = {"train.steps": steps, "train.log_every": 1, "checkpoint.every": 3, "model.num_kv_heads": 4}
    overrides.update({f"mesh.{axis}": size for axis, size in {"data": 1, "fsdp": 1, "tensor": 1, **mesh}.items()})
    return tiny_config("llama", overrides)

  expected = _train(config(6, fsdp=8), tmp_path / "straight")
  _train(config(3, fsdp=8), tmp_path / "fsdp8")
  shutil.copytree(tmp_path / "fsdp8", tmp_path / "one_device")

  resumed = _train(config(6, data=2, tensor=4), tmp_path / "fsdp8")
  for step in (4, 5, 6):
    np.testing.assert_allclose(resumed[step]["loss"], expected[step]["loss"], rtol=1e-5)

  # On one device, as a user would: the CLI in a process that sees a single CPU device.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  overrides = [f"--config.{path}={value}" for path, value in _overrides_of(config(6, data=1)).items()]
  result = subprocess.run(
      [sys.executable, "-m", "lm.train", "--config=configs/quickstart.py", f"--workdir={tmp_path / 'one_device'}",
       *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert "Resuming from step 3" in result.stdout
  one_device = {row["step"]: row for row in _rows(tmp_path / "one_device")}
  np.testing.assert_allclose(one_device[4]["loss"], expected[4]["loss"], rtol=1e-5)


def _overrides_of(config) -> dict:
  """The fields of `config` that differ from configs/quickstart.py, as "section.field" -> value."""
  from lm.config import load_config_file

  base = load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
  return {
      f"{section}.{field}": value
      for section in config
      for field, value in config[section].items()
      if base[section][field] != value and not isinstance(value, tuple)
  }


def _with_nan_weights(monkeypatch, nan_steps):
  """Makes the batches of `nan_steps` carry NaN weights, so their gradients are NaN."""
  original = loop.TrainSetup.train_batches

  def train_batches(self, start_step=0):
    for step, batch in enumerate(original(self, start_step), start_step):
      if step in nan_steps:
        batch = dict(batch, weights=batch["weights"] * np.float32("nan"))
      yield batch

  monkeypatch.setattr(loop.TrainSetup, "train_batches", train_batches)


def test_steps_with_nan_gradients_are_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
  _with_nan_weights(monkeypatch, nan_steps={2, 3})
  config = tiny_config("llama", {"train.steps": 6, "train.log_every": 1})
  rows = _train(config, tmp_path / "run")
  assert rows[3]["loss"] is None and rows[4]["loss"] is None  # steps 3 and 4 ran batches 2 and 3
  assert [rows[step]["bad_steps_in_a_row"] for step in range(1, 7)] == [0, 0, 1, 2, 0, 0]
  assert rows[6]["bad_steps"] == 2
  assert all(np.isfinite(rows[step]["loss"]) for step in (1, 2, 5, 6))
  state = checkpoint.restore_latest(checkpoint.manager(str(tmp_path / "run"), config.checkpoint),
                                    loop.setup(config).abstract_state).state  # fmt: skip
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_too_many_nan_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
  _with_nan_weights(monkeypatch, nan_steps=set(range(5, 100)))
  config = tiny_config("llama", {"train.steps": 20, "train.max_bad_steps": 3, "checkpoint.every": 4})
  with pytest.raises(loop.TrainingError, match="3 steps in a row up to step 8"):
    loop.train(config, str(tmp_path / "run"))
  checkpoints = checkpoint.manager(str(tmp_path / "run"), config.checkpoint)
  assert checkpoints.latest_step() == 4  # the run stopped at step 8 instead of saving it
  state = checkpoint.restore_latest(checkpoints, loop.setup(config).abstract_state).state
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_an_unfinished_checkpoint_is_never_restored(tiny_config, tmp_path):
  config = tiny_config("llama", {"train.steps": 4, "checkpoint.every": 2})
  loop.train(config, str(tmp_path / "run"))
  directory = tmp_path / "run" / "checkpoints"
  shutil.copytree(directory / "4", directory / "6.orbax-checkpoint-tmp-1234")  # a save killed before its rename
  (directory / "6.orbax-checkpoint-tmp-1234" / "state" / "_METADATA").write_text("{truncated")
  checkpoints = checkpoint.manager(str(tmp_path / "run"), config.checkpoint)
  assert checkpoints.latest_step() == 4


def test_half_written_and_later_metric_rows_are_dropped_on_resume(tmp_path):
  from lm import metrics

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
  metrics.keep_rows_up_to(str(path), 2)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_init_from_loads_another_runs_params(tiny_config, tmp_path):
  source = tiny_config("llama", {"train.steps": 3})
  loop.train(source, str(tmp_path / "source"))
  source_state = checkpoint.restore_latest(
      checkpoint.manager(str(tmp_path / "source"), source.checkpoint), loop.setup(source).abstract_state
  ).state

  finetune = tiny_config("llama", {"train.steps": 3, "checkpoint.init_from": str(tmp_path / "source")})
  finetune.optimizer.learning_rate = 1e-4
  run = loop.setup(finetune)
  state = checkpoint.init_from(finetune.checkpoint, run.init_state(), run.abstract_state)
  jax.tree.map(np.testing.assert_array_equal, state.params, source_state.params)
  fresh = run.init_state()  # a new run keeps its own step count and optimizer state
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh.opt_state)

  wider = tiny_config("llama", {"model.mlp_dim": 96, "checkpoint.init_from": str(tmp_path / "source")})
  run = loop.setup(wider)
  with pytest.raises(ConfigError, match=r"params/layers/mlp/down/kernel has shape \(2, 64, 32\) .* but \(2, 96, 32\)"):
    checkpoint.init_from(wider.checkpoint, run.init_state(), run.abstract_state)


def test_resuming_with_another_model_is_a_one_line_error(tiny_config, tmp_path):
  loop.train(tiny_config("llama", {"train.steps": 2}), str(tmp_path))
  with pytest.raises(UserError, match=r"another model: params/layers/mlp/down/kernel has shape \(2, 64, 32\) .* but \(2, 96, 32\)"):
    loop.train(tiny_config("llama", {"train.steps": 4, "model.mlp_dim": 96}), str(tmp_path))
  loop.train(tiny_config("llama", {"train.steps": 4}), str(tmp_path))  # the same model resumes
  assert checkpoint.manager(str(tmp_path), tiny_config().checkpoint).latest_step() == 4


def test_resuming_with_another_tokenizer_is_refused_and_the_kept_one_continues(text_config, tmp_path):
  fixed_vocab = {"model.vocab_size": 384, "train.steps": 2, "eval.every": 0}
  loop.train(text_config(fixed_vocab), str(tmp_path))
  kept = tmp_path / "tokenizer.model"
  kept_bytes = kept.read_bytes()
  other_tokenizer = text_config({**fixed_vocab, "train.steps": 4, "data.tokenizer_vocab_size": 300})
  with pytest.raises(ConfigError, match=f"^data.tokenizer: .* --config.data.tokenizer={kept}$"):
    loop.train(other_tokenizer, str(tmp_path))
  assert kept.read_bytes() == kept_bytes
  other_tokenizer.data.tokenizer = str(kept)
  loop.train(other_tokenizer, str(tmp_path))
  assert checkpoint.manager(str(tmp_path), other_tokenizer.checkpoint).latest_step() == 4
