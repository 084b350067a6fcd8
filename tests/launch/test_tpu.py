"""launch/tpu.py --dry_run: the fit check first, then the gcloud commands it would run, overrides quoted
so they arrive intact."""

import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ["--config.data.source=text:/data/my corpus", "--config.optimizer.no_weight_decay=('norm',)", "--config.x=$HOME;rm"]


def _launch(*flags: str, train_args=("--config=configs/llama_1b.py", "--workdir=/mnt/shared/run", *OVERRIDES)):
  return subprocess.run(
      [sys.executable, "launch/tpu.py", "--name=lm-test", "--project=my-project", "--zone=us-west4-a",
       "--accelerator=v5litepod-16", "--runtime=v2-alpha-tpuv5-lite", *flags, "--dry_run", "--", *train_args],
      cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip


def _dry_run(*flags: str) -> list[list[str]]:
  """Each printed gcloud command, split the way a shell would (OVERRIDES are no config, so no fit check)."""
  result = _launch("--skip_fit_check", *flags)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line, comments=True) for line in result.stdout.strip().splitlines()]


def _remote_command(argv: list[str]) -> list[str]:
  (command,) = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--command=")]
  return shlex.split(command)


def test_tpu_vm_create_install_run_stream():
  commands = _dry_run("--spot")
  assert commands[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
  create = commands[1]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lm-test"]
  assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot", "--zone=us-west4-a",
          "--project=my-project"} <= set(create)  # fmt: skip
  scp = next(c for c in commands if "scp" in c)
  assert "--worker=all" in scp and "lm-test:~/lm.tar.gz" in scp
  install = next(c for c in commands if "ssh" in c and "pip" in " ".join(c))
  assert "--worker=all" in install and 'pip install -q -e "$HOME/lm[tpu]"' in " ".join(install)

  run = next(c for c in commands if "ssh" in c and "lm.train" in " ".join(c) and "--worker=all" in c)
  remote = _remote_command(run)
  start = remote.index("python3")
  assert remote[start : start + 3] == ["python3", "-m", "lm.train"]
  assert remote[start + 3 : start + 5] == ["--config=configs/llama_1b.py", "--workdir=/mnt/shared/run"]
  assert remote[start + 5 : start + 5 + len(OVERRIDES)] == OVERRIDES  # each override one word, untouched

  stream = commands[-1]
  assert "--worker=0" in stream and "tail" in _remote_command(stream)
  assert not any("delete" in command for command in commands)


def test_queued_spot_slice_deleted_after():
  commands = _dry_run("--spot", "--queued", "--delete_after")
  create = commands[1]
  assert create[3:6] == ["queued-resources", "create", "lm-test"]
  assert {"--node-id=lm-test", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)
  assert commands[2][3:5] == ["queued-resources", "describe"]
  assert commands[-1][3:] == ["queued-resources", "delete", "lm-test", "--force", "--quiet", "--zone=us-west4-a", "--project=my-project"]


def test_missing_training_arguments_are_an_error():
  result = subprocess.run(
      [sys.executable, "launch/tpu.py", "--name=a", "--project=p", "--zone=z", "--accelerator=v4-8", "--runtime=r",
       "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert result.returncode != 0 and "pass --config=... and --workdir=..." in result.stderr


# A small model that compiles in seconds; 8192 wide, its replicated float32 AdamW state (34 GB) fits no v5e chip.
SMALL = ["--config=configs/quickstart.py", "--config.data.source=synthetic", "--config.model.vocab_size=1024",
         "--config.model.num_layers=2"]  # fmt: skip
WIDE = ["--config.model.embed_dim=8192", "--config.model.mlp_dim=32768", "--config.model.num_heads=64",
        "--config.model.num_kv_heads=8"]  # fmt: skip


def test_fit_check_runs_before_anything_is_created():
  pytest.importorskip("libtpu", reason="the fit check compiles for a TPU: pip install -e '.[tpu]'")
  result = _launch(train_args=[*SMALL, "--config.train.steps", "70", "--workdir=/mnt/shared/run"])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  check = next(index for index, line in enumerate(lines) if line.startswith("# fit check:"))
  assert "--topology=v5litepod-16" in lines[check] and "--workdir" not in lines[check]
  assert "--config.train.steps 70" in lines[check]  # a value given as the next argument travels with its flag
  assert json.loads(next(line for line in lines if line.startswith("{")))["fits"]
  first_gcloud = next(index for index, line in enumerate(lines) if line.startswith("gcloud"))
  assert check < first_gcloud


def test_a_config_that_does_not_fit_stops_before_any_gcloud_command():
  pytest.importorskip("libtpu", reason="the fit check compiles for a TPU: pip install -e '.[tpu]'")
  result = _launch(train_args=[*SMALL, *WIDE, "--workdir=/mnt/shared/run"])
  assert result.returncode != 0
  assert not any(line.startswith("gcloud") for line in result.stdout.splitlines())
  assert "error: does not fit" in result.stderr and "nothing was created" in result.stderr
