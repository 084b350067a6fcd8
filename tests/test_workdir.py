"""The workdir: one trainer at a time (a lock that a dead holder does not keep), paths resolved once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lm import workdir as workdir_lib
from lm.config import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with open(path, "w") as f:
    json.dump({"purpose": "training", "since": "earlier", "command": "lm.train", **holder}, f)
  return path


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
  with workdir_lib.Lock(str(tmp_path), "training"):
    with pytest.raises(UserError, match=f"is in use: training process {os.getpid()} on ") as error:
      with workdir_lib.Lock(str(tmp_path), "import"):
        pass
    assert "\n" not in str(error.value)
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)  # released at exit


def test_the_lock_of_a_process_that_ended_is_taken_over(tmp_path, capsys):
  ended = subprocess.Popen([sys.executable, "-c", "pass"])
  ended.wait()
  _write_lock(tmp_path, host=workdir_lib.socket.gethostname(), pid=ended.pid)
  with workdir_lib.Lock(str(tmp_path), "training"):
    pass
  assert f"taking over the lock of a training process {ended.pid}" in capsys.readouterr().out


def test_a_reused_process_id_does_not_keep_the_lock(tmp_path):
  """The id of a running process, but not the process that wrote the lock (another start time)."""
  _write_lock(tmp_path, host=workdir_lib.socket.gethostname(), pid=os.getpid(), process_start="1")
  with workdir_lib.Lock(str(tmp_path), "training"):
    pass


def test_another_hosts_lock_holds_while_its_heartbeat_is_fresh(tmp_path):
  path = _write_lock(tmp_path, host="another-host", pid=1)
  with pytest.raises(UserError, match="process 1 on another-host"):
    with workdir_lib.Lock(str(tmp_path), "training"):
      pass
  old = time.time() - workdir_lib.STALE_SECONDS - 1
  os.utime(path, (old, old))
  with workdir_lib.Lock(str(tmp_path), "training"):
    pass


def _train(workdir, steps, home=None):
  command = [
      sys.executable, "-m", "lm.train", "--config=configs/quickstart.py", f"--workdir={workdir}",
      "--config.data.source=synthetic", "--config.model.num_layers=1", "--config.model.embed_dim=32",
      "--config.model.mlp_dim=64", "--config.data.seq_len=16", "--config.data.batch_size=8",
      "--config.optimizer.warmup_steps=1", f"--config.train.steps={steps}", "--config.train.log_every=1",
      "--config.checkpoint.every=2",
  ]  # fmt: skip
  env = dict(os.environ, HOME=str(home)) if home else None
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  first = _train(workdir, steps=100_000)
  deadline = time.time() + 240
  while not (workdir / "checkpoints" / "2").exists():  # the first one trains and has saved
    assert first.poll() is None and time.time() < deadline, first.communicate()
    time.sleep(0.5)
  second = _train(workdir, steps=4)
  _, stderr = second.communicate(timeout=600)
  assert second.returncode == 1
  (line,) = stderr.strip().splitlines()
  assert f"is in use: training process {first.pid} on " in line and "lm.train" in line
  assert first.poll() is None  # still training

  first.send_signal(signal.SIGKILL)
  first.wait()
  steps = max(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()) + 2
  third = _train(workdir, steps=steps)
  stdout, stderr = third.communicate(timeout=600)
  assert third.returncode == 0, stderr
  assert f"taking over the lock of a training process {first.pid}" in stdout and "Resuming from step" in stdout
  assert not (workdir / workdir_lib.LOCK_FILE).exists()


def test_a_workdir_under_home_is_one_folder(tmp_path):
  """--workdir=~/x is not expanded by the shell after `=`: lm puts everything in $HOME/x, nothing in ./~."""
  home = tmp_path / "home"
  home.mkdir()
  process = _train("~/x", steps=2, home=home)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr
  assert sorted(os.listdir(home / "x")) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
  assert not os.path.exists(os.path.join(REPO, "~"))


def test_of_several_processes_taking_over_one_stale_lock_only_one_gets_it(tmp_path):
  ended = subprocess.Popen([sys.executable, "-c", "pass"])
  ended.wait()
  script = (
      "import os, sys, time\n"
      "from lm import workdir\n"
      "from lm.config import UserError\n"
      "folder, go, release = sys.argv[1:]\n"
      "print('ready', flush=True)\n"
      "while not os.path.exists(go): time.sleep(0.001)\n"  # all try at the same moment, however slow their start
      "try:\n"
      "  with workdir.Lock(folder, 'training'):\n"
      "    print('held', flush=True)\n"
      "    while not os.path.exists(release): time.sleep(0.01)\n"  # held until every other one has tried
      "except UserError:\n"
      "  print('refused', flush=True)\n"
  )
  for attempt in range(3):
    _write_lock(tmp_path, host=workdir_lib.socket.gethostname(), pid=ended.pid)
    go, release = tmp_path.parent / f"go-{attempt}", tmp_path.parent / f"release-{attempt}"
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(go), str(release)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]  # fmt: skip
    assert [process.stdout.readline().strip() for process in processes] == ["ready"] * 4
    go.touch()
    deadline = time.time() + 300
    while sum(process.poll() is not None for process in processes) < 3 and time.time() < deadline:
      time.sleep(0.05)  # the refused ones end; the holder waits for `release`
    release.touch()
    outcomes = sorted(process.communicate(timeout=600)[0].split()[-1] for process in processes)
    assert outcomes == ["held", "refused", "refused", "refused"]


def test_a_lock_file_is_never_seen_half_written(tmp_path, monkeypatch):
  """It is written aside, then linked into place: a reader finds the whole holder or no file."""
  seen = []
  real_link = os.link

  def link(source, target):
    seen.append(json.load(open(source)))  # what the lock file will hold, complete before it appears
    assert not os.path.exists(target)
    real_link(source, target)

  monkeypatch.setattr(os, "link", link)
  with workdir_lib.Lock(str(tmp_path), "training"):
    assert json.load(open(tmp_path / workdir_lib.LOCK_FILE)) == seen[0]
  assert [name for name in os.listdir(tmp_path)] == []


def test_a_holder_whose_lock_is_deleted_puts_it_back_or_stops_if_another_took_it(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, "HEARTBEAT_SECONDS", 0.05)
  path = tmp_path / workdir_lib.LOCK_FILE
  with workdir_lib.Lock(str(tmp_path), "training") as lock:
    os.remove(path)
    time.sleep(0.5)
    assert json.load(open(path))["pid"] == os.getpid()  # put back
    lock.check()
    os.remove(path)
    _write_lock(tmp_path, host="another-host", pid=7)
    time.sleep(0.5)
    with pytest.raises(UserError, match="was deleted while in use, and a training process 7 on another-host since .* writes there"):
      lock.check()
  assert json.load(open(path))["pid"] == 7  # the other writer's lock is left alone


def test_a_waiting_lock_waits_for_the_holder(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, "WAIT_SECONDS", 0.1)
  order = []
  holder = workdir_lib.Lock(str(tmp_path), "data preparation", file_name="prepare.lock").__enter__()

  def release_later():
    time.sleep(0.5)
    order.append("released")
    holder.__exit__(None, None, None)

  import threading

  threading.Thread(target=release_later).start()
  with workdir_lib.Lock(str(tmp_path), "data preparation", wait=True, file_name="prepare.lock"):
    order.append("acquired")
  assert order == ["released", "acquired"]


def test_a_second_trainer_is_refused_before_it_prepares_any_data(tmp_path, text_config):
  from lm.train import loop

  config = text_config({"data.data_dir": str(tmp_path / "fresh_data")})
  with workdir_lib.Lock(str(tmp_path / "run"), "training"):
    with pytest.raises(UserError, match="is in use"):
      loop.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "fresh_data").exists()
