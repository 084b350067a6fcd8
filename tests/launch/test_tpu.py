"""launch/tpu.py --dry_run: the gcloud commands it would run, overrides quoted so they arrive intact."""

import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ["--config.data.source=text:/data/my corpus", "--config.optimizer.no_weight_decay=('norm',)", "--config.x=$HOME;rm"]


def _dry_run(*flags: str) -> list[list[str]]:
  """Each printed command, split the way a shell would."""
  result = subprocess.run(
      [sys.executable, "launch/tpu.py", "--name=lm-test", "--project=my-project", "--zone=us-west4-a",
       "--accelerator=v5litepod-16", "--runtime=v2-alpha-tpuv5-lite", *flags, "--dry_run", "--",
       "--config=configs/llama_1b.py", "--workdir=/mnt/shared/run", *OVERRIDES],
      cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
  )  # fmt: skip
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
       "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert result.returncode != 0 and "pass --config=... and --workdir=..." in result.stderr
