"""The training loop: ties config, mesh, state, data, step and metrics together."""

import dataclasses
import os
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from lm import config as config_lib
from lm import metrics as metrics_lib
from lm import sharding
from lm.data import pipeline, tfds_builder, tokenizer as tokenizer_lib
from lm.models import Transformer
from lm.train import optimizer, state as state_lib, step as step_lib


@dataclasses.dataclass
class TrainSetup:
  """What a run is made of, built from its config."""

  mesh: Mesh
  axis_rules: sharding.Rules
  model: nn.Module
  state: state_lib.TrainState
  state_shardings: state_lib.TrainState
  train_step: sharding.MeshJit  # (state, batch, rng) -> (state, metrics)
  tokenizer: tokenizer_lib.Tokenizer | None  # None for synthetic data
  dataset: tfds_builder.TokenizedText | None

  def train_batches(self, config: ml_collections.ConfigDict, start_step: int = 0):
    """The global batches of steps start_step, start_step + 1, ..."""
    eos_id = self.tokenizer.eos_id if self.tokenizer else None
    return pipeline.train_batches(config, self.mesh, self.axis_rules, self.dataset, eos_id, start_step)


def setup(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> TrainSetup:
  """Checks the config, prepares the data, then builds the mesh (over `devices`, default all), model, state and step.

  With a tokenizer, config.model.vocab_size is set to its vocabulary padded to model.vocab_multiple.
  """
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(config, len(devices))
  tokenizer, dataset = None, None
  if config.data.source != "synthetic":
    tokenizer, dataset = tfds_builder.prepare(config.data)
    config.model.vocab_size = tokenizer_lib.padded_vocab_size(tokenizer.vocab_size, config.model.vocab_multiple)
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config.mesh)
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  tx, schedule = optimizer.make(config.optimizer, config.train.steps)
  state, state_shardings = state_lib.create(model, tx, mesh, axis_rules, config.train.seed)
  train_step = step_lib.make_train_step(model, tx, schedule, config.train, mesh, axis_rules, state_shardings)
  return TrainSetup(mesh, axis_rules, model, state, state_shardings, train_step, tokenizer, dataset)


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains `config` for config.train.steps steps, writing everything under `workdir`."""
  run = setup(config)  # before config.json is written: it fills in the vocabulary size
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  state = run.state
  start_step = int(state.step)
  batches = run.train_batches(config, start_step)
  step_rng = jax.random.key(config.train.seed)

  writer = metrics_lib.MetricsWriter(workdir, config.train.steps)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  throughput = metrics_lib.Throughput(
      metrics_lib.flops_per_token(config.model, config.data.seq_len),
      metrics_lib.peak_flops(jax.devices()[0]),
      jax.device_count(),
  )
  throughput.reset(start_step)

  def log(logged_step: int, device_metrics: dict[str, jax.Array]) -> None:
    host_metrics = jax.device_get(device_metrics)  # waits for that step to finish
    writer.write(logged_step, {**host_metrics, **throughput.measure(logged_step, tokens_per_step)})

  # A logged step's metrics are fetched only after the next step is dispatched, so the device
  # always has work queued while the host waits.
  pending = None
  for step in range(start_step, config.train.steps):
    state, step_metrics = run.train_step(state, next(batches), jax.random.fold_in(step_rng, step))
    if pending is not None:
      log(*pending)
      pending = None
    if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.steps:
      pending = (step + 1, step_metrics)
  if pending is not None:
    log(*pending)
  writer.close()
