"""Train on a Cloud TPU VM slice: create it, install lm on every worker, run, stream worker 0's log.

    python launch/tpu.py --name=lm-v5e --project=my-project --zone=us-west4-a \
        --accelerator=v5litepod-256 --runtime=v2-alpha-tpuv5-lite --spot --queued \
        -- --config=configs/llama_1b.py --workdir=/mnt/shared/llama_1b --config.train.steps=20000

Everything after `--` goes to `python -m lm.train` on every worker; the workers find each other
by themselves (jax.distributed detects TPU VM slices). The workdir must be a directory every
worker sees (a bucket mounted with gcsfuse, or Filestore): that is where checkpoints go, so that
running the same command again after a preemption resumes the run. --setup runs first on every
worker, for example to mount that bucket. --dry_run prints each gcloud command and runs none.

Before anything is created, the config is compiled here for the slice's topology
(`python -m lm.compile`, which needs `pip install -e '.[tpu]'` on this machine): a config that
does not fit in the chips' memory, or cannot be sharded over them, stops here, with what to
change. --skip_fit_check skips it.
"""

import argparse
import shlex
import subprocess
import sys
import time

LOG = "~/lm-train.log"


class Shell:
  """Runs commands, or with dry_run only prints them (as lines a shell would run the same way)."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, argv: list[str]) -> None:
    print(shlex.join(argv), flush=True)
    if not self.dry_run:
      subprocess.run(argv, check=True)

  def succeeds(self, argv: list[str]) -> bool:
    """Whether `argv` exits 0; under dry_run it is printed and taken to fail."""
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return False
    return subprocess.run(argv, capture_output=True).returncode == 0

  def output(self, argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def config_arguments(train_args: list[str]) -> list[str]:
  """lm.train's --config and --config.a.b flags, with their values (`--config.a.b=1` or `--config.a.b 1`)."""
  kept = []
  for index, arg in enumerate(train_args):
    if arg.startswith(("--config=", "--config.")):
      kept.append(arg)
      if "=" not in arg and index + 1 < len(train_args):
        kept.append(train_args[index + 1])
  return kept


def fit_check(args, train_args: list[str]) -> None:
  """Compiles the training step for the slice on this machine; exits, having created nothing, if it does not fit."""
  config_args = config_arguments(train_args)
  command = [sys.executable, "-m", "lm.compile", *config_args, f"--topology={args.accelerator}"]
  print("# fit check: " + shlex.join(command), flush=True)
  if subprocess.run(command).returncode != 0:
    sys.exit("The fit check above failed, so nothing was created. Change the config, or pass --skip_fit_check.")


def gcloud_tpu(args, *command: str) -> list[str]:
  """`gcloud compute tpus ...` for this slice's zone and project."""
  return ["gcloud", "compute", "tpus", *command, f"--zone={args.zone}", f"--project={args.project}"]


def ssh(args, worker: str, remote_command: str) -> list[str]:
  return gcloud_tpu(args, "tpu-vm", "ssh", args.name, f"--worker={worker}", f"--command={remote_command}")


def create(args, shell: Shell) -> None:
  """Creates the slice unless it exists; a queued resource waits until it is granted."""
  if shell.succeeds(gcloud_tpu(args, "tpu-vm", "describe", args.name)):
    print(f"{args.name} exists; not creating it", flush=True)
    return
  spot = ["--spot"] if args.spot else []
  if not args.queued:
    shell.run(gcloud_tpu(args, "tpu-vm", "create", args.name, f"--accelerator-type={args.accelerator}",
                         f"--version={args.runtime}", *spot))  # fmt: skip
    return
  shell.run(gcloud_tpu(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                       f"--accelerator-type={args.accelerator}", f"--runtime-version={args.runtime}", *spot))  # fmt: skip
  state = gcloud_tpu(args, "queued-resources", "describe", args.name, "--format=value(state.state)")
  print(shlex.join(state) + "   # repeated until ACTIVE", flush=True)
  while not shell.dry_run and shell.output(state) != "ACTIVE":
    time.sleep(30)


def install(args, shell: Shell) -> None:
  """Copies this checkout (its git-tracked files) to every worker and pip-installs it with the TPU extra."""
  archive = f"/tmp/lm-{args.name}.tar.gz"
  shell.run(["bash", "-c", f"git ls-files -z | xargs -0 tar -czf {shlex.quote(archive)}"])
  shell.run(gcloud_tpu(args, "tpu-vm", "scp", archive, f"{args.name}:~/lm.tar.gz", "--worker=all"))
  if args.setup:
    shell.run(ssh(args, "all", args.setup))
  shell.run(ssh(args, "all", "mkdir -p ~/lm && tar -xzf ~/lm.tar.gz -C ~/lm && pip install -q -e \"$HOME/lm[tpu]\""))


def train_command(train_args: list[str]) -> str:
  """The shell command each worker runs: lm.train in the background, detached from the ssh session."""
  train = shlex.join(["python3", "-m", "lm.train", *train_args])
  return f"cd ~/lm && setsid nohup {train} > {LOG} 2>&1 < /dev/null &"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name.")
  parser.add_argument("--project", required=True)
  parser.add_argument("--zone", required=True)
  parser.add_argument("--accelerator", required=True, help="e.g. v5litepod-256, v5p-128, v4-32.")
  parser.add_argument("--runtime", required=True, help="TPU software version, e.g. v2-alpha-tpuv5-lite.")
  parser.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity.")
  parser.add_argument("--queued", action="store_true", help="Ask through a queued resource, which waits for capacity.")
  parser.add_argument("--setup", default="", help="A shell command run on every worker before installing lm.")
  parser.add_argument("--delete_after", action="store_true", help="Delete the slice when training ends.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands; run none (the fit check runs).")
  parser.add_argument("--skip_fit_check", action="store_true", help="Do not compile the config for the slice first.")
  parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of lm.train.")
  args = parser.parse_args()
  train_args = [arg for arg in args.train_args if arg != "--"]
  if not any(arg.startswith("--config=") for arg in train_args) or not any(arg.startswith("--workdir=") for arg in train_args):
    parser.error("pass --config=... and --workdir=... for lm.train after --")

  if not args.skip_fit_check:
    fit_check(args, train_args)
  shell = Shell(args.dry_run)
  create(args, shell)
  install(args, shell)
  shell.run(ssh(args, "all", train_command(train_args)))
  # tail follows the log until the training process on worker 0 ends.
  shell.run(ssh(args, "0", f"sleep 5; tail -n +1 -F {LOG} --pid=$(pgrep -f -o lm.train)"))
  if args.delete_after:
    kind = ["queued-resources", "delete", args.name, "--force"] if args.queued else ["tpu-vm", "delete", args.name]
    shell.run(gcloud_tpu(args, *kind, "--quiet"))


if __name__ == "__main__":
  sys.exit(main())
