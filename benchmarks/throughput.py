"""Steady-state training throughput of a config on this machine's accelerators.

    python benchmarks/throughput.py --config=configs/gpt2_124m.py --config.train.microbatches=1 \
        --config.data.batch_size=64 --json=gpt2_124m.json

Times `--windows` windows of `--steps` training steps after `--warmup` steps (compilation
included there), synchronizing with the device only at window edges, and reports the median:
step time, tokens per second per device, MFU and peak device memory. Data is synthetic unless
--real_data. MFU counts 6 FLOPs per matmul weight per token (LM head included, embedding lookups
not) plus causal attention, over the device's dense bf16 peak (lm/metrics.py); the PaLM
(non-causal) figure is printed beside it.
"""

import datetime
import json
import os
import statistics
import sys
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from lm import metrics, xla_flags
from lm.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (they compile).")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows; the median is reported.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per window.")
_REAL_DATA = flags.DEFINE_bool("real_data", False, "Feed the config's data instead of synthetic batches.")
_PEAK_FLOPS = flags.DEFINE_float("peak_flops", 0.0, "Per-device peak FLOP/s, where lm does not know the device's.")
_GPU_FLAGS = flags.DEFINE_bool("xla_gpu_flags", False, "Add lm/xla_flags.py's GPU flags to XLA_FLAGS.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "After timing, trace 2 more steps with jax.profiler into this folder.")


def measure(config: ml_collections.ConfigDict) -> dict:
  """Times training steps of `config`; returns the numbers the table shows."""
  run = loop.setup(config)
  state = run.init_state()
  batches = run.train_batches()
  rng = jax.random.key(0)
  warmup_start = time.perf_counter()
  for step in range(_WARMUP.value):
    state, step_metrics = run.train_step(state, next(batches), jax.random.fold_in(rng, step))
  jax.block_until_ready(step_metrics)
  warmup_seconds = time.perf_counter() - warmup_start
  window_seconds = []
  for window in range(_WINDOWS.value):
    start = time.perf_counter()
    for step in range(_STEPS.value):
      state, step_metrics = run.train_step(state, next(batches), jax.random.fold_in(rng, window * _STEPS.value + step))
    jax.block_until_ready(step_metrics)
    window_seconds.append((time.perf_counter() - start) / _STEPS.value)
  if _TRACE_DIR.value:
    with jax.profiler.trace(_TRACE_DIR.value):
      for step in range(2):
        state, step_metrics = run.train_step(state, next(batches), jax.random.fold_in(rng, _WINDOWS.value * _STEPS.value + step))
      jax.block_until_ready(step_metrics)

  step_seconds = statistics.median(window_seconds)
  num_devices = jax.device_count()
  tokens_per_step = config.data.batch_size * config.data.seq_len
  tokens_per_second_per_device = tokens_per_step / step_seconds / num_devices
  device = jax.devices()[0]
  peak = _PEAK_FLOPS.value or metrics.peak_flops(device)
  memory = device.memory_stats() or {}
  result = {
      "date": datetime.date.today().isoformat(),
      "command": " ".join(sys.argv),
      "device": device.device_kind,
      "num_devices": num_devices,
      "jax_version": jax.__version__,
      "parameters": sum(leaf.size for leaf in jax.tree.leaves(state.params)),
      "matmul_parameters": metrics.matmul_params(config.model),
      "tokens_per_step": tokens_per_step,
      "warmup_seconds": warmup_seconds,  # the untimed first steps: compilation, mostly
      "step_seconds": step_seconds,
      "step_seconds_per_window": window_seconds,
      "tokens_per_second_per_device": tokens_per_second_per_device,
      "peak_memory_bytes": memory.get("peak_bytes_in_use"),
  }
  if peak:
    for name, causal in (("mfu", True), ("mfu_palm", False)):
      flops = metrics.flops_per_token(config.model, config.data.seq_len, causal=causal)
      result[name] = tokens_per_second_per_device * flops / peak
  return result


def main(argv):
  del argv
  if _GPU_FLAGS.value:  # before the first jax call creates the backend, which reads XLA_FLAGS
    os.environ["XLA_FLAGS"] = xla_flags.with_flags(os.environ.get("XLA_FLAGS", ""), xla_flags.GPU)
  config = ml_collections.ConfigDict(_CONFIG.value)
  if not _REAL_DATA.value:
    config.data.source = "synthetic"
  result = measure(config)
  memory = result["peak_memory_bytes"]
  rows = [
      ("device", f"{result['num_devices']} x {result['device']}"),
      ("parameters", f"{result['parameters'] / 1e6:,.1f}M ({result['matmul_parameters'] / 1e6:,.1f}M in matmuls)"),
      ("tokens per step", f"{result['tokens_per_step']:,}"),
      ("warmup (compiles)", f"{result['warmup_seconds']:,.1f} s"),
      ("step time", f"{result['step_seconds'] * 1e3:,.1f} ms"),
      ("tokens/s per device", f"{result['tokens_per_second_per_device']:,.0f}"),
      ("MFU (causal)", f"{100 * result['mfu']:.1f}%" if "mfu" in result else "n/a (unknown peak; --peak_flops)"),
      ("MFU (PaLM, non-causal)", f"{100 * result['mfu_palm']:.1f}%" if "mfu_palm" in result else "n/a"),
      ("peak memory", f"{memory / 2**30:.2f} GiB" if memory else "n/a"),
  ]
  for name, value in rows:
    print(f"{name:>24}  {value}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
