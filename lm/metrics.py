"""Metrics writers (metrics.jsonl, TensorBoard, a terminal line) and FLOPs / MFU accounting."""

import json
import math
import os
import time

import jax
import ml_collections

from lm import workdir as workdir_lib

# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind (lower case).
PEAK_FLOPS_BY_DEVICE_KIND = (
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6", 918e12),
)


def matmul_params(model: ml_collections.ConfigDict) -> int:
  """Parameters of every weight matrix applied to activations (LM head included, embedding lookups excluded).

  A T5 counts its decoder's blocks (with cross-attention) too, as if they ran on every encoder token:
  an upper bound, since its decoder reads a fraction of that. A mixture of experts counts the active
  parameters: the experts_per_token experts each token goes through, and the router.
  """
  head_dim = model.get("head_dim", 0) or model.embed_dim // model.num_heads
  attention = model.embed_dim * head_dim * (2 * model.num_heads + 2 * model.num_kv_heads)  # q, o, k, v
  mlp = (3 if model.family in ("llama", "t5") else 2) * model.embed_dim * model.mlp_dim
  if model.get("num_experts", 0):
    mlp = model.experts_per_token * mlp + model.embed_dim * model.num_experts
  blocks = model.num_layers * (attention + mlp)
  if model.family == "t5":
    blocks += (model.num_decoder_layers or model.num_layers) * (2 * attention + mlp)
  if model.family == "bert":
    blocks += model.embed_dim * model.embed_dim  # the MLM head's transform
  return blocks + model.embed_dim * model.vocab_size


def flops_per_token(model: ml_collections.ConfigDict, seq_len: int, causal: bool | None = None) -> float:
  """Training FLOPs per token: 6 * matmul params + attention scores (halved when causal masking skips them;
  `causal` None: as the model family attends)."""
  if causal is None:
    causal = model.family in ("llama", "gpt2")
  head_dim = model.get("head_dim", 0) or model.embed_dim // model.num_heads
  attention = 12 * model.num_layers * seq_len * model.num_heads * head_dim
  return 6 * matmul_params(model) + (attention / 2 if causal else attention)


def peak_flops(device: jax.Device) -> float | None:
  """The device's dense bf16 peak in FLOP/s, or None when unknown (CPUs)."""
  kind = device.device_kind.lower()
  for name, peak in PEAK_FLOPS_BY_DEVICE_KIND:
    if name in kind:
      return peak
  return None


def format_duration(seconds: float) -> str:
  """1h02m, 3m05s, 42s."""
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def keep_rows_up_to(path: str, step: int) -> None:
  """Drops the rows of metrics.jsonl after `step`, and any line a killed run left half-written."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and row.get("step", step + 1) <= step:
        kept.append(json.dumps(row) + "\n")
  partial_path = path + ".partial"
  with open(partial_path, "w") as f:
    f.writelines(kept)
  os.replace(partial_path, path)


class MetricsWriter:
  """Writes one row per logged step to metrics.jsonl, TensorBoard and the terminal (process 0 only).

  A run resumed at `start_step` first drops what the interrupted run logged after it, so each
  step appears once.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
    self.total_steps = total_steps
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported here: only process 0 writes

      jsonl_path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
      keep_rows_up_to(jsonl_path, start_step)
      self._jsonl = open(jsonl_path, "a")
      # purge_step makes TensorBoard discard the interrupted run's events after start_step (all of them at 0).
      self._tensorboard = SummaryWriter(workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR), purge_step=start_step + 1)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Records `metrics` (plain floats) for `step`."""
    if not self.enabled:
      return
    row = {"step": step, **{name: float(value) for name, value in metrics.items()}}
    # NaN and Inf are not JSON; they are written as null.
    self._jsonl.write(json.dumps({name: value if math.isfinite(value) else None for name, value in row.items()}) + "\n")
    self._jsonl.flush()
    for name, value in row.items():
      if name != "step" and math.isfinite(value):
        self._tensorboard.add_scalar(name, value, step)
    self._tensorboard.flush()
    print(self._line(row), flush=True)

  def _line(self, row: dict[str, float]) -> str:
    parts = [f"step {row['step']}/{self.total_steps}"]
    parts += [f"{name} {row[name]:.4f}" for name in ("loss", "eval_loss", "eval_accuracy") if name in row]
    if "expert_load_max" in row:  # a mixture of experts: its most and least loaded expert (1 = balanced)
      parts.append(f"experts {row['expert_load_min']:.2f}-{row['expert_load_max']:.2f}x")
    if "learning_rate" in row:
      parts.append(f"lr {row['learning_rate']:.2e}")
    if "tokens_per_second" in row:
      parts.append(f"{row['tokens_per_second']:,.0f} tok/s")
    if "mfu" in row:
      parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if "seconds_per_step" in row:
      parts.append(f"ETA {format_duration(row['seconds_per_step'] * (self.total_steps - row['step']))}")
    return " | ".join(parts)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


class Throughput:
  """Tokens per second and MFU between consecutive calls of `measure`."""

  def __init__(self, flops_per_token: float, peak_flops_per_device: float | None, num_devices: int):
    self.flops_per_token = flops_per_token
    self.peak_flops = None if peak_flops_per_device is None else peak_flops_per_device * num_devices
    self._last_time = time.perf_counter()
    self._last_step = 0

  def reset(self, step: int) -> None:
    """Starts a new window at `step` (after restoring, or after compilation)."""
    self._last_time, self._last_step = time.perf_counter(), step

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (spent evaluating, say) out of the current window."""
    self._last_time += seconds

  def measure(self, step: int, tokens_per_step: float) -> dict[str, float]:
    """Rates over the steps since the last call."""
    now = time.perf_counter()
    seconds_per_step = (now - self._last_time) / max(step - self._last_step, 1)
    self._last_time, self._last_step = now, step
    tokens_per_second = tokens_per_step / seconds_per_step
    rates = {"tokens_per_second": tokens_per_second, "seconds_per_step": seconds_per_step}
    if self.peak_flops is not None:
      rates["mfu"] = tokens_per_second * self.flops_per_token / self.peak_flops
    return rates


class CollapseDetector:
  """Notices a model collapsed to the uniform distribution, which can never learn again: the loss at
  ln(vocab_size) with zero gradients, `rows` logged steps in a row (a learning rate far too high does it)."""

  def __init__(self, vocab_size: int, rows: int = 3):
    self.uniform_loss, self.rows = math.log(vocab_size), rows
    self._since, self._count, self._said = None, 0, False

  def check(self, step: int, loss: float, grad_norm: float) -> str | None:
    """A one-line warning the first time the collapse has lasted `rows` logged steps; else None."""
    collapsed = grad_norm == 0.0 and abs(loss - self.uniform_loss) < 1e-3 * self.uniform_loss
    self._since, self._count = (self._since or step, self._count + 1) if collapsed else (None, 0)
    if self._count < self.rows or self._said:
      return None
    self._said = True
    return (
        f"Warning: since step {self._since} the loss has stayed at ln(vocab_size) = {self.uniform_loss:.4f} with zero "
        "gradients: the model has collapsed to a uniform distribution and will not learn again. Stop the run, lower "
        "optimizer.learning_rate, and start again in a new workdir."
    )


class StepProfiler:
  """A jax.profiler trace of the steps first ... first + count - 1, written where TensorBoard's profile tab
  (tensorboard-plugin-profile) finds it: `directory`/plugins/profile/<time>/<host>.xplane.pb."""

  def __init__(self, directory: str, first: int, count: int):
    self.directory, self.first, self.last = directory, first, first + count - 1
    self.tracing = False
    self._last_traced = None  # (step, its outputs): the trace ends once they are computed

  def __enter__(self) -> "StepProfiler":
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def before_step(self, step: int) -> None:
    """Starts the trace before step `first` is dispatched."""
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.directory)
      self.tracing = True

  def after_step(self, step: int, outputs) -> None:
    """Ends the trace once step `last` has finished on the device."""
    if self.tracing:
      self._last_traced = (step, outputs)
      if step >= self.last:
        self.stop()

  def stop(self) -> None:
    """Ends the trace, after the last traced step finishes (also when the run ends before step `last`)."""
    if not self.tracing:
      return
    if self._last_traced is not None:  # None: the first traced step failed
      jax.block_until_ready(self._last_traced[1])
    jax.profiler.stop_trace()
    self.tracing = False
    if self._last_traced is not None and jax.process_index() == 0:
      last_step = self._last_traced[0]
      print(f"Profiled steps {self.first + 1} to {last_step + 1}: open {self.directory} in TensorBoard's profile tab", flush=True)
