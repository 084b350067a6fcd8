"""The training loop: ties config, mesh, state, data, step and metrics together."""

import contextlib
import dataclasses
import functools
import os
import time
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from lm import config as config_lib
from lm import checkpoints as checkpoints_lib
from lm import distributed, objectives, sharding
from lm import workdir as workdir_lib
from lm import evaluate as evaluate_lib
from lm import metrics as metrics_lib
from lm.data import pipeline, tfds_builder, tokenizer as tokenizer_lib
from lm import models
from lm.models import pipeline as pipeline_parallel
from lm.train import checkpoint, optimizer, state as state_lib, step as step_lib


@dataclasses.dataclass
class TrainSetup:
  """What a run is made of, built from its config."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  axis_rules: sharding.Rules
  model: nn.Module
  tx: optax.GradientTransformation
  abstract_state: state_lib.TrainState  # shapes, dtypes and shardings, no values
  train_step: sharding.MeshJit  # (state, batch, rng) -> (state, metrics)
  eval_step: sharding.MeshJit  # (params, batch, byte_lengths_V) -> sums
  tokenizer: tokenizer_lib.Tokenizer | None  # None for synthetic data
  dataset: tfds.core.DatasetBuilder | None  # TokenizedText, or TokenizedExamples for an objective that reads them
  objective: objectives.Objective

  def init_state(self) -> state_lib.TrainState:
    """A freshly initialized state, sharded over the mesh."""
    return state_lib.init(self.model, self.tx, self.abstract_state, self.config.train.seed)

  def train_batches(self, start_step: int = 0):
    """The global batches of steps start_step, start_step + 1, ..."""
    return pipeline.train_batches(self.config, self.mesh, self.axis_rules, self.dataset, self.tokenizer, start_step)

  @functools.cached_property
  def _byte_lengths(self) -> np.ndarray:
    return self.tokenizer.byte_lengths(self.config.model.vocab_size)

  def evaluate(self, params) -> dict[str, float]:
    """The objective's metrics over eval.steps batches of the validation split, as eval_<metric>."""
    config = self.config
    batches = pipeline.eval_batches(config, self.mesh, self.axis_rules, self.dataset, self.tokenizer, config.eval.steps)
    result = evaluate_lib.evaluate(self.eval_step, params, batches, self._byte_lengths, self.objective)
    return {f"eval_{name}": value for name, value in result.items() if name not in ("tokens", "examples")}


def setup(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    prepare_data: bool = True,
    workdir: str | None = None,
) -> TrainSetup:
  """Checks the config, prepares the data, then builds the mesh (over `devices`, default all), model, state and step.

  A model.vocab_size of 0 becomes the tokenizer's vocabulary (with synthetic data, or without
  `prepare_data`, the data.tokenizer_vocab_size a tokenizer would have at most), rounded up to
  model.vocab_multiple. `workdir` is the run's own, from which a resumed checkpoint.init_model run
  takes its model.
  """
  devices = list(jax.devices() if devices is None else devices)
  config_lib.resolve_paths(config)
  if config.checkpoint.init_from and config.checkpoint.get("init_model"):
    _model_of_init_run(config, workdir)
  config_lib.validate(config, len(devices))
  objective = objectives.get(config)
  tokenizer, dataset = None, None
  if prepare_data and config.data.source != "synthetic":
    tokenizer, dataset = tfds_builder.prepare(config.data, objective)
    if config.model.vocab_size and config.model.vocab_size < tokenizer.vocab_size:
      raise config_lib.ConfigError(
          f"model.vocab_size: {config.model.vocab_size} rows cannot embed the tokenizer's {tokenizer.vocab_size} pieces; "
          "raise it, or set 0 to size it from the tokenizer"
      )
    if objective.reads_examples:
      _require_examples(config, dataset)
    elif config.eval.every and pipeline.num_windows(dataset, "validation", pipeline.stream_stride(config)) < config.data.batch_size:
      raise config_lib.ConfigError(
          f"data.validation_fraction: the validation split ({dataset.info.metadata['validation_tokens']:,} tokens) "
          f"holds less than one batch of data.batch_size x data.seq_len; raise it, or set eval.every=0"
      )
  if config.model.vocab_size == 0:
    pieces = tokenizer.vocab_size if tokenizer else config.data.tokenizer_vocab_size
    config.model.vocab_size = tokenizer_lib.padded_vocab_size(pieces, config.model.vocab_multiple)
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config.mesh)
  model = models.get(config.model, num_classes=objective.num_classes)
  tx, schedule = optimizer.make(config.optimizer, config.train.steps)
  abstract = state_lib.abstract_state(model, tx, mesh, axis_rules)
  shardings = sharding.shardings_of(abstract)
  train_step = step_lib.make_train_step(model, objective, tx, schedule, config.train, mesh, axis_rules, shardings)
  eval_step = evaluate_lib.make_eval_step(model, objective, mesh, axis_rules, shardings.params)
  return TrainSetup(config, mesh, axis_rules, model, tx, abstract, train_step, eval_step, tokenizer, dataset, objective)


# What a run may choose for itself when it takes its model from checkpoint.init_from: how it computes, not
# what it computes (the parameters' shapes and meaning).
_EXECUTION_FIELDS = (
    "dtype", "param_dtype", "fp8_matmuls", "attention", "cudnn_max_documents", "loss_chunk_len", "scan_unroll",
    "remat_policy", "dropout_rate", "pipeline_microbatches", "expert_capacity_factor",
)  # fmt: skip


def _model_of_init_run(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """checkpoint.init_model: model.* from checkpoint.init_from's run (but _EXECUTION_FIELDS), and its tokenizer
  unless data.tokenizer names one. A run resumed in `workdir` takes them from its own checkpoints and
  workdir instead, so it never needs the other run again."""
  own = workdir and os.path.isdir(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR))
  other = checkpoints_lib.read_only_manager(workdir if own else config.checkpoint.init_from)
  if other.latest_step() is None:
    if own:  # no step saved yet: as a new run
      return _model_of_init_run(config, None)
    raise config_lib.ConfigError(f"checkpoint.init_from: no checkpoint in {other.directory}")
  model = checkpoints_lib.restore_config(other, other.latest_step()).model
  for field in _EXECUTION_FIELDS:
    if field in config.model:
      model[field] = config.model[field]
  config.model = model
  run_dir = os.path.dirname(str(other.directory))
  if not config.data.tokenizer and config.data.source != "synthetic":
    tokenizer_path = workdir_lib.tokenizer_path(run_dir)
    if not tokenizer_path:
      raise config_lib.ConfigError(f"checkpoint.init_from: {run_dir} keeps no tokenizer; name one with data.tokenizer")
    config.data.tokenizer = tokenizer_path


def _require_examples(config: ml_collections.ConfigDict, dataset) -> None:
  """A ConfigError unless the training split (and, when evaluating, the validation split) holds examples."""
  meta = dataset.info.metadata
  splits = ("train", "validation") if config.eval.every else ("train",)
  for split in splits:
    if not meta[f"{split}_examples"]:
      from lm.data import examples

      what = "data.validation_fraction" if split == "validation" else "data.source"
      raise config_lib.ConfigError(f"{what}: the {split} split holds no examples ({examples.summary(dataset)})")


class TrainingError(config_lib.UserError):
  """A run that cannot go on (for example, gradients that stay NaN); the message says what to change."""


def data_position(config: ml_collections.ConfigDict, run: TrainSetup, next_step: int) -> dict:
  """What the data pipeline needs to continue exactly: the batch at step k depends only on these and k."""
  dataset = run.dataset.builder_config.name if run.dataset else "synthetic"
  return {
      "dataset": dataset,
      "seed": config.data.seed,
      "batch_size": config.data.batch_size,  # row r of step k is window k * batch_size + r
      "seq_len": config.data.seq_len,
      "next_step": next_step,
  }


def _keep_tokenizer(tokenizer: tokenizer_lib.Tokenizer, workdir: str, resuming: bool) -> None:
  """Copies the tokenizer into the workdir, so evaluation and export never depend on the data cache.

  A resumed run must go on with the tokenizer its checkpoints were trained with.
  """
  kept_path = workdir_lib.tokenizer_path(workdir)
  if resuming and kept_path:
    if tokenizer_lib.load(kept_path).fingerprint != tokenizer.fingerprint:
      raise config_lib.ConfigError(
          f"data.tokenizer: the checkpoints in {workdir} were trained with another tokenizer than the data's; "
          f"continue them with --config.data.tokenizer={kept_path}"
      )
    return
  if jax.process_index() == 0 and os.path.abspath(tokenizer.path) != kept_path:
    tokenizer.copy_to(workdir)


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains `config` for config.train.steps steps under `workdir`, resuming from its latest checkpoint.

  The workdir is locked while training (by process 0 of several): a second trainer is refused.
  """
  workdir = config_lib.absolute_path(workdir)
  lock = workdir_lib.Lock(workdir, "training") if jax.process_index() == 0 else None
  with lock or contextlib.nullcontext():
    run = setup(config, workdir=workdir)  # before config.json is written: it fills in the vocabulary size
    _train(config, workdir, run, lock)


def _train(config: ml_collections.ConfigDict, workdir: str, run: TrainSetup, lock: workdir_lib.Lock | None) -> None:
  """`train`, with the workdir locked (by this process, or by process 0)."""
  checkpoints = checkpoint.manager(workdir, config.checkpoint)
  saver = checkpoint.Saver(checkpoints)
  restored = checkpoint.restore_latest(checkpoints, run.abstract_state)
  if run.tokenizer:
    _keep_tokenizer(run.tokenizer, workdir, resuming=restored is not None)
  if jax.process_index() == 0:
    with open(workdir_lib.path(workdir, workdir_lib.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    if run.dataset:
      workdir_lib.record_dataset(workdir, run.dataset)
  evaluating = bool(config.eval.every) and run.dataset is not None
  num_stages = run.mesh.shape.get("stage", 1)
  if num_stages > 1:
    in_flight = config.model.pipeline_microbatches or 2 * num_stages
    distributed.log(
        f"Pipeline: {config.model.num_layers // num_stages} layers on each of {num_stages} stages, {in_flight} microbatches "
        f"in flight: each stage idles {100 * pipeline_parallel.bubble_fraction(num_stages, in_flight):.0f}% of the step (the bubble)"
    )
  if config.eval.every and not evaluating:
    distributed.log("Not evaluating: synthetic data has no validation split")

  if restored:
    state, start_step, progress = restored.state, restored.step, restored.metadata
    position = data_position(config, run, start_step)
    changed = [f"{key} {restored.data[key]} -> {position[key]}" for key in position if restored.data.get(key, position[key]) != position[key]]
    if changed:
      distributed.log(
          f"Warning: the data changed since the checkpoint ({'; '.join(changed)}): from step {start_step} on, the "
          "batches are not those the interrupted run would have seen"
      )
    distributed.log(f"Resuming from step {start_step} ({checkpoints.directory})")
  else:
    state, start_step, progress = run.init_state(), 0, {"tokens_seen": 0, "train_seconds": 0.0}
    if config.checkpoint.init_from:
      state = checkpoint.init_from(config.checkpoint, state, run.abstract_state, new_heads=("classifier",))
  if start_step >= config.train.steps:
    distributed.log(f"Nothing to do: the run is at step {start_step} of train.steps={config.train.steps}")
    return

  batches = run.train_batches(start_step)
  step_rng = jax.random.key(config.train.seed)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  writer = metrics_lib.MetricsWriter(workdir, config.train.steps, start_step)
  throughput = metrics_lib.Throughput(
      metrics_lib.flops_per_token(config.model, config.data.seq_len),
      metrics_lib.peak_flops(jax.devices()[0]),
      jax.device_count(),
  )
  if not restored and config.checkpoint.init_from and evaluating:  # where fine-tuning starts, to compare with
    writer.write(0, run.evaluate(state.params))
  throughput.reset(start_step)
  # Steps are numbered from 0 here; the first one compiles, so the trace starts at the next.
  profiler = metrics_lib.StepProfiler(workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR), start_step + 1, config.train.profile_steps)
  started = time.perf_counter()

  def save(step: int) -> None:
    if not state_lib.is_finite(state):  # never saved: the checkpoints kept so far stay as they are
      saver.finish()
      raise TrainingError(
          f"after step {step} the parameters or optimizer state hold NaN or Inf, so they were not saved; the last "
          f"checkpoint, step {checkpoints.latest_step()}, is intact. Lower optimizer.learning_rate (or look at the data "
          "of the steps since) and rerun to resume from it."
      )
    metadata = {
        "tokens_seen": progress["tokens_seen"] + (step - start_step) * tokens_per_step,
        "train_seconds": progress["train_seconds"] + time.perf_counter() - started,
    }
    saver.save(step, state, data_position(config, run, step), config, metadata)

  eval_results = {}  # step -> eval metrics, written with that step's row
  collapse = metrics_lib.CollapseDetector(config.model.vocab_size)

  def settle(settled_step: int, device_metrics: dict[str, jax.Array], always_log: bool = False) -> None:
    """Logs a finished step's metrics when due, and stops a run whose gradients stay non-finite."""
    if always_log or settled_step % config.train.log_every == 0 or settled_step in eval_results:
      host_metrics = jax.device_get(device_metrics)  # waits for that step to finish
      rates = throughput.measure(settled_step, tokens_per_step)
      writer.write(settled_step, {**host_metrics, **rates, **eval_results.pop(settled_step, {})})
      warning = collapse.check(settled_step, float(host_metrics["loss"]), float(host_metrics["grad_norm"]))
      if warning:
        distributed.log(warning)
    bad_in_a_row = int(device_metrics["bad_steps_in_a_row"])
    if bad_in_a_row >= config.train.max_bad_steps:
      saver.finish()
      raise TrainingError(
          f"{bad_in_a_row} steps in a row up to step {settled_step} had NaN or Inf gradients and were skipped; "
          f"stopped. The last checkpoint is step {checkpoints.latest_step()}. Lower optimizer.learning_rate, "
          "raise train.max_bad_steps, or look at the data of those steps."
      )

  # A step's metrics are read only after the next step is dispatched, so the device always has work
  # queued while the host waits on them; a step that is checkpointed is settled at once, so its
  # metrics row is on disk before its checkpoint can be.
  previous = None  # (step number, device metrics) of the step not settled yet
  with checkpoint.PreemptionWatcher(checkpoints) as preemption, profiler:
    for step in range(start_step, config.train.steps):
      profiler.before_step(step)
      state, step_metrics = run.train_step(state, next(batches), jax.random.fold_in(step_rng, step))
      profiler.after_step(step, step_metrics)
      saver.after_step()
      if lock:
        lock.check()
      if previous is not None:
        settle(*previous)
      done = step + 1
      previous = (done, step_metrics)
      if evaluating and (done % config.eval.every == 0 or done == config.train.steps):
        eval_started = time.perf_counter()
        eval_results[done] = run.evaluate(state.params)
        throughput.exclude(time.perf_counter() - eval_started)
      stopping = preemption.requested(done)  # asked once: a signal arriving later waits for the next step
      every = config.checkpoint.every
      if stopping or (every and done % every == 0) or done == config.train.steps:
        settle(done, step_metrics, always_log=True)
        previous = None
        save(done)
      if stopping:
        saver.finish()
        writer.close()
        raise SystemExit(
            f"Stopped by {preemption.signal_name} after step {done}: checkpoint saved in {checkpoints.directory}. "
            "Rerun the same command to resume."
        )
  saver.finish()
  writer.close()
