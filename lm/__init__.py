"""lm: pretrain Transformer language models in JAX."""

import glob
import os

__version__ = "0.1.0"


def _quiet_libtpu_without_tpu_chips() -> None:
  """With libtpu installed (the tpu extra) on a machine with no TPU chips, jax's TPU start-up fails and
  falls back to the GPU or CPU, but libtpu first prints lines of warnings about a TPU VM's missing
  metadata. Say there is none, so it gives up quietly. On a TPU VM (chips under /dev) nothing changes."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")  # any known type; no chip will be found
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # with no chips to share, several processes may load it


_quiet_libtpu_without_tpu_chips()


def load(workdir: str, step: int | None = None):
  """A run's checkpoint on this machine's devices, to evaluate and generate from (see lm.inference)."""
  from lm import inference  # imported on use: `import lm` stays light

  return inference.load(workdir, step)
