"""Joining a multi-process run (jax.distributed): every host runs the same program on its own devices."""

import os

import jax

_NO_CLUSTER = "coordinator_address should be defined"  # jax's words when it finds no cluster around it


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = 100,
) -> None:
  """Connects this process to the others of the run, if there are any.

  Explicit arguments (or JAX_COORDINATOR_ADDRESS in the environment) win; otherwise JAX detects
  TPU VM slices, SLURM, Open MPI and Kubernetes jobs; elsewhere the run is a single process.
  A process that stops sending heartbeats for `heartbeat_timeout_seconds` (it crashed, or its host
  died) makes every other process stop with a message, instead of waiting forever.
  """
  explicit = coordinator_address or num_processes or process_id is not None or os.environ.get("JAX_COORDINATOR_ADDRESS")
  try:
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds
    )
  except ValueError as error:
    if explicit or _NO_CLUSTER not in str(error):
      raise


def log(message: str) -> None:
  """Prints on process 0 only: every process runs the same code, and one copy of each line is enough."""
  if jax.process_index() == 0:
    print(message, flush=True)
