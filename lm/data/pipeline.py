"""Batches for training and evaluation, read with grain; each process builds only its own rows.

The global batch at step k is a pure function of (data.seed, k): row r is window k * B + r of an
endless sequence of windows, reshuffled every epoch. So it is the same with 1 process or 16,
and after a restart at any step.

Shape letters: B rows (this process's, or global), T data.seq_len.
"""

import functools
import sys
from typing import Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.sharding import Mesh

from lm import objectives, sharding
from lm.config import ConfigError
from lm.data import batch as batch_lib
from lm.data import examples, synthetic, tfds_builder
from lm.models import attention

_READ_THREADS = 4  # grain threads building upcoming batches
_PREFETCH_BATCHES = 8  # at least _READ_THREADS, or threads sit idle
# Random choices in rows (masks, dropped spans) are drawn from (data.seed, salt, window index): training's
# windows and evaluation's are numbered apart, so they draw apart.
_TRAIN_SALT, _EVAL_SALT = 0, 1

def num_windows(builder: tfds.core.DatasetBuilder, split: str, stride: int) -> int:
  """How many windows of stride + 1 tokens, `stride` apart, the split's token stream holds (stride: data.seq_len,
  or the objective's stream_stride)."""
  return max((builder.info.metadata[f"{split}_tokens"] - 1) // stride, 0)


def _read_window(chunks, stride: int, window: int) -> np.ndarray:
  """Stream tokens [window * L, window * L + L + 1) from the chunked records (L = stride): [L + 1]."""
  start = window * stride
  first, last = start // tfds_builder.CHUNK_TOKENS, (start + stride) // tfds_builder.CHUNK_TOKENS
  tokens = np.concatenate([chunks[index]["tokens"] for index in range(first, last + 1)])
  offset = start - first * tfds_builder.CHUNK_TOKENS
  return tokens[offset : offset + stride + 1]


def _windows(builder: tfds.core.DatasetBuilder, split: str, stride: int, shuffle_seed: int | None) -> grain.MapDataset:
  """Window index -> [stride + 1] tokens; with a seed, an endless sequence reshuffled each epoch."""
  count = num_windows(builder, split, stride)
  if count == 0:
    tokens = builder.info.metadata[f"{split}_tokens"]
    raise ConfigError(f"data.seq_len: the {split} split ({tokens:,} tokens) holds less than one row of {stride} + 1 tokens")
  windows = grain.MapDataset.range(count)
  if shuffle_seed is not None:
    windows = windows.shuffle(seed=shuffle_seed).repeat()
  return windows.map(functools.partial(_read_window, builder.as_data_source(split), stride))


def _rows_of_step(
    windows: grain.MapDataset, global_batch: int, rows: np.ndarray, to_rows: Callable, max_documents: int | None, step: int
) -> batch_lib.Rows:
  """This process's rows of a step: its windows of the stream made into rows by `to_rows(tokens_BL, window_indices_B)`."""
  window_indices_B = step * global_batch + rows
  packed = to_rows(np.stack([windows[window] for window in window_indices_B]), window_indices_B)
  most_documents = int(packed["segment_ids"][:, -1].max())  # segment ids count a row's documents from 1
  if max_documents and most_documents > max_documents:
    logging.log_first_n(
        logging.WARNING,
        f"a row of step {step} holds {most_documents} documents, more than model.cudnn_max_documents={max_documents}: "
        "cuDNN attention joins the last ones, which then see each other; raise model.cudnn_max_documents",
        1,
    )
  return packed


def _example_rows_of_step(packed: examples.PackedRows, global_batch: int, rows: np.ndarray, seq_len: int, step: int) -> batch_lib.Rows:
  return batch_lib.from_examples([packed.row(step * global_batch + row) for row in rows], seq_len)


def _stream_rows(config: ml_collections.ConfigDict, tokenizer, split_salt: int) -> Callable:
  """The objective's rows_from_stream for this data, with the seed its random choices are drawn from."""
  objective = objectives.get(config)
  seed = (config.data.seed, split_salt)
  return lambda tokens_BL, window_indices_B: objective.rows_from_stream(tokens_BL, window_indices_B, tokenizer, seed)


def stream_stride(config: ml_collections.ConfigDict) -> int:
  """Windows of the token stream start this many tokens apart (and hold one more)."""
  return objectives.get(config).stream_stride(config.data.seq_len)


def _cudnn_document_cap(config: ml_collections.ConfigDict, mesh: Mesh) -> int | None:
  """model.cudnn_max_documents when attention runs on cuDNN, which keeps only that many documents per row apart."""
  platform = mesh.devices.flat[0].platform
  return config.model.cudnn_max_documents if attention.kernel_name(config.model.attention, platform) == "cudnn" else None


def _global_batches(steps: grain.MapDataset, batch_sharding, global_batch: int) -> Iterator[dict[str, jax.Array]]:
  """Reads steps ahead in threads and assembles each into global arrays."""
  read_options = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
  for rows in steps.to_iter_dataset(read_options):
    yield sharding.global_batch_from_local(batch_sharding, rows, global_batch)


def train_batches(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    axis_rules: sharding.Rules,
    builder: tfds.core.DatasetBuilder | None,
    tokenizer,
    start_step: int = 0,
) -> Iterator[dict[str, jax.Array]]:
  """The global batches of steps start_step, start_step + 1, ...; `builder` and `tokenizer` are None for synthetic data."""
  data = config.data
  batch_sharding = sharding.logical_sharding(mesh, axis_rules, sharding.BATCH_AXES)
  rows = sharding.process_rows(batch_sharding, (data.batch_size, data.seq_len))
  if data.source == "synthetic":
    step_rows = functools.partial(
        synthetic.rows, data.seed, global_batch=data.batch_size, row_indices=rows, seq_len=data.seq_len,
        vocab_size=config.model.vocab_size,
    )
  elif objectives.get(config).reads_examples:
    packed = examples.PackedRows(builder, "train", data.seq_len, data.seed, config.model.cudnn_max_documents)
    step_rows = functools.partial(_example_rows_of_step, packed, data.batch_size, rows, data.seq_len)
  else:
    windows = _windows(builder, "train", stream_stride(config), shuffle_seed=data.seed)
    to_rows = _stream_rows(config, tokenizer, _TRAIN_SALT)
    step_rows = functools.partial(_rows_of_step, windows, data.batch_size, rows, to_rows, _cudnn_document_cap(config, mesh))
  steps = grain.MapDataset.range(start_step, sys.maxsize).map(step_rows)
  return _global_batches(steps, batch_sharding, data.batch_size)


def eval_batches(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    axis_rules: sharding.Rules,
    builder: tfds.core.DatasetBuilder,
    tokenizer,
    max_batches: int = 0,
    split: str = "validation",
) -> Iterator[dict[str, jax.Array]]:
  """A split in order, in global batches; at most `max_batches` if > 0.

  A stream's last partial batch is dropped; examples are all kept, the last batch padded with empty rows.
  """
  data = config.data
  batch_sharding = sharding.logical_sharding(mesh, axis_rules, sharding.BATCH_AXES)
  rows = sharding.process_rows(batch_sharding, (data.batch_size, data.seq_len))
  if objectives.get(config).reads_examples:
    packed = examples.PackedRows(builder, split, data.seq_len, None, config.model.cudnn_max_documents)
    count = -(-len(packed) // data.batch_size)
    step_rows = functools.partial(_example_rows_of_step, packed, data.batch_size, rows, data.seq_len)
  else:
    windows = _windows(builder, split, stream_stride(config), shuffle_seed=None)
    count = len(windows) // data.batch_size
    to_rows = _stream_rows(config, tokenizer, _EVAL_SALT)
    step_rows = functools.partial(_rows_of_step, windows, data.batch_size, rows, to_rows, _cudnn_document_cap(config, mesh))
  if max_batches > 0:
    count = min(count, max_batches)
  steps = grain.MapDataset.range(count).map(step_rows)
  return _global_batches(steps, batch_sharding, data.batch_size)
