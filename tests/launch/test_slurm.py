"""launch/slurm.py --dry_run: the sbatch script."""

import os
import shlex
import subprocess
import sys

from lm import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(*flags: str) -> list[str]:
  result = subprocess.run(
      [sys.executable, "launch/slurm.py", *flags, "--dry_run", "--", "--config=configs/llama_8b.py",
       "--workdir=/shared/runs/a", "--config.data.source=text:/data/it's here"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
  )  # fmt: skip
  return result.stdout.splitlines()


def test_one_process_per_gpu_by_default():
  lines = _script("--nodes=4", "--gpus_per_node=8", "--partition=gpu", "--time=12:00:00")
  assert lines[0] == "#!/bin/bash"
  directives = {line.split()[1] for line in lines if line.startswith("#SBATCH")}
  assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=12:00:00",
          "--signal=TERM@120", "--requeue", "--output=/shared/runs/a/logs/slurm-%j.out"} <= directives  # fmt: skip
  (srun,) = [shlex.split(line) for line in lines if line.startswith("srun")]
  assert srun[srun.index("python") :] == [
      "python", "-m", "lm.train", "--config=configs/llama_8b.py", "--workdir=/shared/runs/a",
      "--config.data.source=text:/data/it's here",
  ]  # fmt: skip
  exported = [shlex.split(line)[1] for line in lines if line.startswith("export XLA_FLAGS=")]
  assert exported == ["XLA_FLAGS=" + " ".join(xla_flags.GPU)]


def test_one_process_per_node():
  directives = [line for line in _script("--nodes=2", "--processes_per_node=1") if line.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=1" in directives and "#SBATCH --gpus-per-node=8" in directives
