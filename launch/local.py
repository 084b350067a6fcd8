"""Rehearse a multi-host run on this machine: N processes of `python -m lm.train`, CPU devices each.

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        --config=configs/quickstart.py --workdir=runs/two_hosts

Everything after `--` goes to every process. The processes find each other through
jax.distributed on localhost, exactly as hosts of a pod slice or GPU cluster do. Process 0's
output is shown; every process's output is also in WORKDIR/logs/process_<i>.log. If a process
fails, the others stop within --heartbeat_timeout_seconds, and so does this launcher, with the
failing process's exit status.
"""

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
  """A TCP port nobody listens on right now, for the coordinator."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def process_commands(processes: int, port: int, heartbeat_timeout_seconds: int, train_args: list[str]) -> list[list[str]]:
  """The command line of each process."""
  return [
      [
          sys.executable, "-m", "lm.train", *train_args,
          f"--coordinator_address=localhost:{port}", f"--num_processes={processes}", f"--process_id={process_id}",
          f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds}",
      ]
      for process_id in range(processes)
  ]  # fmt: skip


def workdir_of(train_args: list[str]) -> str:
  """The --workdir=... among the training arguments."""
  for arg in train_args:
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
  sys.exit("error: pass --workdir=DIR after --")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2, help="Processes to start (stand-ins for hosts).")
  parser.add_argument("--devices_per_process", type=int, default=4, help="Simulated CPU devices in each process.")
  parser.add_argument("--heartbeat_timeout_seconds", type=int, default=30, help="How soon a dead process stops the rest.")
  parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of lm.train.")
  args = parser.parse_args()
  train_args = [arg for arg in args.train_args if arg != "--"]
  log_dir = os.path.join(workdir_of(train_args), "logs")
  os.makedirs(log_dir, exist_ok=True)

  inherited_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in flag]
  device_flag = f"--xla_force_host_platform_device_count={args.devices_per_process}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*inherited_flags, device_flag]))
  commands = process_commands(args.processes, free_port(), args.heartbeat_timeout_seconds, train_args)
  running = []
  for process_id, command in enumerate(commands):
    log = open(os.path.join(log_dir, f"process_{process_id}.log"), "a")  # a refused second launch erases nothing
    # Process 0 is shown as it runs (through tee); the others only go to their logs.
    stdout = subprocess.PIPE if process_id == 0 else log
    running.append((subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True), log))

  first, first_log = running[0]
  for line in first.stdout:
    print(line, end="", flush=True)
    first_log.write(line)
  statuses = []
  for process, log in running:
    statuses.append(process.wait())
    log.close()
  failed = [(i, status) for i, status in enumerate(statuses) if status != 0]
  if failed:
    process_id, status = failed[0]
    print(f"process {process_id} exited with status {status}; see {log_dir}/process_{process_id}.log", file=sys.stderr)
    sys.exit(status if 0 < status < 256 else 1)


if __name__ == "__main__":
  main()
