"""Global batches for training: each process builds only its own rows, assembled into jax.Arrays."""

import itertools
from typing import Iterator

import jax
import ml_collections
from jax.sharding import Mesh

from lm import sharding
from lm.data import synthetic


def train_batches(
    config: ml_collections.ConfigDict, mesh: Mesh, axis_rules: sharding.Rules, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
  """Yields the global batch for steps start_step, start_step + 1, ... sharded over the data axes."""
  data = config.data
  batch_sharding = sharding.logical_sharding(mesh, axis_rules, sharding.BATCH_AXES)
  row_range = sharding.process_rows(batch_sharding, (data.batch_size, data.seq_len))
  for step in itertools.count(start_step):
    local_rows = synthetic.rows(data.seed, step, data.batch_size, row_range, data.seq_len, config.model.vocab_size)
    yield sharding.global_batch_from_local(batch_sharding, local_rows, data.batch_size)
