"""launch/local.py: 2 processes x 4 devices compute what 1 x 8 does, checkpoints cross between them, a death stops all."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def launch(corpus_dir, tmp_path_factory):
  """Runs launch/local.py on the test corpus with a tiny model; returns the finished process."""
  data_dir = tmp_path_factory.mktemp("local_data")

  def run(workdir, processes: int, steps: int, background: bool = False, mesh: tuple[str, ...] = ()):
    command = [
        sys.executable, "launch/local.py", f"--processes={processes}", f"--devices_per_process={8 // processes}",
        "--heartbeat_timeout_seconds=10", "--",
        "--config=configs/quickstart.py", f"--workdir={workdir}", f"--config.train.steps={steps}",
        f"--config.data.source=text:{corpus_dir}", f"--config.data.data_dir={data_dir}",
        "--config.data.tokenizer_vocab_size=300", "--config.data.seq_len=32", "--config.data.batch_size=8",
        "--config.model.num_layers=2", "--config.model.embed_dim=32", "--config.model.mlp_dim=64",
        "--config.train.log_every=1", "--config.checkpoint.every=2", "--config.eval.every=2", "--config.eval.steps=2",
        "--config.optimizer.warmup_steps=2", *mesh,
    ]  # fmt: skip
    if background:
      return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result

  return run


def _rows(workdir) -> dict[int, dict]:
  return {row["step"]: row for row in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def _assert_same_numbers(got: dict, expected: dict, steps):
  for step in steps:
    for name in ("loss", "grad_norm", "eval_loss"):
      if name in expected[step]:
        np.testing.assert_allclose(got[step][name], expected[step][name], rtol=1e-6, err_msg=f"{name} at step {step}")


def _resume_from_step_4(workdir, copy):
  """A copy of a finished 6-step run as it was at step 4 (its checkpoint 6 removed)."""
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "6")


# Two hosts as two slices: FSDP over each host's 4 devices, data parallel across hosts (DCN).
TWO_SLICES = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.dcn_data=2")


def test_two_processes_equal_one_and_checkpoints_cross_between_them(launch, tmp_path):
  launch(tmp_path / "one", processes=1, steps=6)  # 8-way data parallel
  expected = _rows(tmp_path / "one")
  launch(tmp_path / "two", processes=2, steps=6, mesh=TWO_SLICES)
  _assert_same_numbers(_rows(tmp_path / "two"), expected, range(1, 7))

  _resume_from_step_4(tmp_path / "two", tmp_path / "two_then_one")
  launch(tmp_path / "two_then_one", processes=1, steps=6)
  _assert_same_numbers(_rows(tmp_path / "two_then_one"), expected, range(1, 7))

  _resume_from_step_4(tmp_path / "one", tmp_path / "one_then_two")
  launch(tmp_path / "one_then_two", processes=2, steps=6, mesh=TWO_SLICES)
  _assert_same_numbers(_rows(tmp_path / "one_then_two"), expected, range(1, 7))

  # A damaged newest step: process 0 finds it, sets it aside, and both processes resume from step 4.
  damaged = tmp_path / "two_damaged"
  shutil.copytree(tmp_path / "two", damaged)
  for directory, _, names in os.walk(damaged / "checkpoints" / "6" / "state"):
    for path in [os.path.join(directory, name) for name in names if os.path.getsize(os.path.join(directory, name)) > 1024]:
      with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
  launch(damaged, processes=2, steps=6, mesh=TWO_SLICES)
  assert any(name.startswith("damaged-6-") for name in os.listdir(damaged / "checkpoints"))
  _assert_same_numbers(_rows(damaged), expected, range(1, 7))


def test_when_one_process_dies_the_others_stop_with_a_message(launch, tmp_path):
  launcher = launch(tmp_path / "run", processes=2, steps=100000, background=True)
  deadline = time.time() + 180
  while not os.path.exists(tmp_path / "run" / "metrics.jsonl") and time.time() < deadline:
    time.sleep(0.2)
  (victim,) = [p for p in psutil.Process(launcher.pid).children() if "--process_id=1" in p.cmdline()]
  victim.send_signal(signal.SIGKILL)
  killed_at = time.time()
  _, stderr = launcher.communicate(timeout=600)
  assert launcher.returncode != 0
  assert time.time() - killed_at < 10 + 30  # the heartbeat timeout, and some slack
  assert "process 0 exited" in stderr or "process 1 exited" in stderr
  log = open(tmp_path / "run" / "logs" / "process_0.log").read()
  assert "another task died" in log or "tasks are unhealthy" in log


def test_sigterm_to_every_process_saves_one_step_and_stops_them_all(launch, tmp_path):
  launcher = launch(tmp_path / "run", processes=2, steps=100000, background=True)
  deadline = time.time() + 180
  while len(_rows_or_empty(tmp_path / "run")) < 3 and time.time() < deadline:
    time.sleep(0.2)
  for process in psutil.Process(launcher.pid).children():
    process.send_signal(signal.SIGTERM)  # as a scheduler preempting the job does
  launcher.communicate(timeout=600)
  logs = [open(tmp_path / "run" / "logs" / f"process_{i}.log").read() for i in range(2)]
  stops = [line for log in logs for line in log.splitlines() if line.startswith("Stopped by")]
  saved = sorted(int(name) for name in os.listdir(tmp_path / "run" / "checkpoints") if name.isdigit())
  assert stops and all(f"after step {saved[-1]}:" in line for line in stops)  # JAX's sync point: the same step
  assert max(_rows_or_empty(tmp_path / "run")) == saved[-1]


def _rows_or_empty(workdir) -> dict[int, dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  rows = {}
  for line in open(path):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    rows[row["step"]] = row
  return rows
