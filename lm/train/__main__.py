"""`python -m lm.train --config=configs/X.py --workdir=DIR [--config.a.b=value ...]`.

On several hosts, the same command runs on each (see launch/); the processes find each other
through the cluster JAX detects, or through --coordinator_address, --num_processes, --process_id.
"""

from absl import flags

from lm import cli, distributed
from lm.train import loop

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "A process silent this long is taken as dead, and the others stop."
)


def main(config) -> None:
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value)
  loop.train(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run_with_config(main)
