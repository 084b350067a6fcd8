"""Memory of a config's compiled training step on this machine's accelerators, without running it.

    python benchmarks/step_memory.py --config=configs/gpt2_124m.py --config.train.microbatches=1 \
        --config.data.batch_size=32 [--devices=1] [--json=out.json]

Compiles the step lm.train runs (python -m lm.compile does the same for TPU topologies) and prints,
per device, parameters + optimizer state, batch, XLA's temporaries and their total, beside the size
the float32 logits of one microbatch would have whole ([rows, T, V], which model.loss_chunk_len
keeps from ever existing). A device that reports its memory limit (GPUs, TPUs) says whether it fits.
"""

import json

import jax
import ml_collections
from absl import flags

from lm import cli
from lm import compile as compile_lib

_DEVICES = flags.DEFINE_integer("devices", 0, "Compile for the first N local devices; 0: all of them.")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")


def main(config: ml_collections.ConfigDict) -> None:
  devices = jax.devices()[: _DEVICES.value or None]
  limit = (devices[0].memory_stats() or {}).get("bytes_limit", 0)
  report = compile_lib.compile_step(config, devices, limit)
  if not limit:
    report["fits"] = None  # this device does not say how much memory it has
  report["device_kind"] = devices[0].device_kind
  report["logits_bytes_per_microbatch"] = (
      4 * config.data.batch_size // config.train.microbatches * config.data.seq_len * config.model.vocab_size
  )

  def gib(value):
    return "n/a" if value is None else f"{value / compile_lib.GiB:,.2f} GiB"

  rows = [
      ("devices", f"{report['devices']} x {report['device_kind']}"),
      ("parameters + optimizer state", gib(report["state_bytes_per_device"])),
      ("batch", gib(report["batch_bytes_per_device"])),
      ("temporaries", gib(report["temp_bytes_per_device"])),
      ("total per device", gib(report["bytes_per_device"]) + (f" of {gib(limit)}" if limit else "")),
      ("whole float32 logits (all devices)", gib(report["logits_bytes_per_microbatch"])),
      ("fits", str(report["fits"]) if limit else "n/a (no memory limit reported)"),
  ]
  for name, value in rows:
    print(f"{name:>36}  {value}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  cli.run_with_config(main)
