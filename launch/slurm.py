"""Train on a SLURM GPU cluster: writes an sbatch script and submits it.

    python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
        -- --config=configs/llama_8b.py --workdir=/shared/runs/llama_8b

Everything after `--` goes to `python -m lm.train` in every task. By default there is one task
(process) per GPU; --processes_per_node=1 gives one process per node that drives all its GPUs.
jax.distributed finds the coordinator and each task's rank and GPU from SLURM's variables. The
job asks SLURM for SIGTERM two minutes before its time limit, so lm saves a checkpoint and exits,
and is requeued on preemption; the workdir must be on a filesystem every node sees, and running
the same job again resumes. --dry_run prints the script and submits nothing.
"""

import argparse
import os
import shlex
import subprocess

from lm import xla_flags


def sbatch_script(args, train_args: list[str]) -> str:
  """The batch script's text."""
  processes_per_node = args.processes_per_node or args.gpus_per_node
  workdir = next(arg.split("=", 1)[1] for arg in train_args if arg.startswith("--workdir="))
  directives = [
      f"--job-name={args.job_name}",
      f"--nodes={args.nodes}",
      f"--ntasks-per-node={processes_per_node}",
      f"--gpus-per-node={args.gpus_per_node}",
      f"--time={args.time}",
      f"--output={os.path.join(workdir, 'logs', 'slurm-%j.out')}",
      "--signal=TERM@120",  # lm saves and exits on SIGTERM
      "--requeue",
      *([f"--partition={args.partition}"] if args.partition else []),
      *([f"--account={args.account}"] if args.account else []),
  ]
  train = shlex.join(["python", "-m", "lm.train", *train_args])
  return "\n".join([
      "#!/bin/bash",
      *(f"#SBATCH {directive}" for directive in directives),
      "",
      "set -euo pipefail",
      f"mkdir -p {shlex.quote(os.path.join(workdir, 'logs'))}",
      f"export XLA_FLAGS={shlex.quote(xla_flags.with_flags('', xla_flags.GPU))}",
      *([args.setup] if args.setup else []),
      "# One task per process; jax.distributed reads SLURM_* to connect them.",
      f"srun --kill-on-bad-exit=1 {train}",
      "",
  ])  # fmt: skip


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--processes_per_node", type=int, default=0, help="Default: one per GPU.")
  parser.add_argument("--partition", default="")
  parser.add_argument("--account", default="")
  parser.add_argument("--time", default="24:00:00", help="Time limit, HH:MM:SS.")
  parser.add_argument("--job_name", default="lm")
  parser.add_argument("--setup", default="", help="Shell lines run before training (e.g. `source venv/bin/activate`).")
  parser.add_argument("--dry_run", action="store_true", help="Print the script; submit nothing.")
  parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of lm.train.")
  args = parser.parse_args()
  train_args = [arg for arg in args.train_args if arg != "--"]
  if not any(arg.startswith("--workdir=") for arg in train_args):
    parser.error("pass --config=... and --workdir=... for lm.train after --")

  script = sbatch_script(args, train_args)
  if args.dry_run:
    print(script, end="")
    return
  workdir = next(arg.split("=", 1)[1] for arg in train_args if arg.startswith("--workdir="))
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)  # SLURM opens --output before the script runs
  subprocess.run(["sbatch"], input=script, text=True, check=True)


if __name__ == "__main__":
  main()
