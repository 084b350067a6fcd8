"""The batch: the one definition of what a train or eval step reads.

A batch is a dict of [B, T] arrays (B rows, T data.seq_len), the rows split over the data axes:
  inputs       int32    the tokens the model reads
  targets      int32    what it is scored on at each position (the next token; for classification,
                        the class at an example's last token)
  weights      float32  how much each position counts in the loss; 0: not at all
  positions    int32    position of each token in its document or example (restarting at each)
  segment_ids  int32    which packed document or example of the row a token belongs to, from 1; 0 is
                        padding. Absent when each row is one document (synthetic data).
Encoder-decoders (span corruption) add what the encoder reads, [B, S] each (S data.seq_len; then T
is the decoder's length): encoder_inputs, encoder_segment_ids and encoder_positions.
Each process builds only its own rows, as numpy arrays; the pipeline assembles global jax.Arrays.

Shape letters: B rows, T length.
"""

from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from lm import sharding
from lm.objectives.base import Example

Rows = dict[str, np.ndarray]  # this process's rows of a batch, by key: [B, T] each

INT_KEYS = ("inputs", "targets", "positions", "segment_ids")


def abstract(config: ml_collections.ConfigDict, mesh: Mesh, axis_rules: sharding.Rules) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes, dtypes and shardings of a global batch of `config`'s data, without reading any."""
  from lm import objectives  # which imports this module's Example

  batch_sharding = sharding.logical_sharding(mesh, axis_rules, sharding.BATCH_AXES)
  lengths = objectives.get(config).batch_lengths(config.data.seq_len)
  if config.data.source == "synthetic":  # one document per row
    del lengths["segment_ids"]
  return {
      name: jax.ShapeDtypeStruct((config.data.batch_size, length), np.float32 if name == "weights" else np.int32, sharding=batch_sharding)
      for name, length in lengths.items()
  }


def from_stream(tokens_BT1: np.ndarray, eos_id: int) -> Rows:
  """Windows of T + 1 tokens of a stream of documents -> rows: each token scored on the next one.

  Every EOS starts a new segment (it plays the part of a BOS), so a document's first token is
  predicted from the EOS alone and no token attends across documents; positions restart there.
  """
  inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  starts_BT = inputs_BT == eos_id
  starts_BT[:, 0] = True
  length = inputs_BT.shape[1]
  last_start_BT = np.maximum.accumulate(np.where(starts_BT, np.arange(length), 0), axis=1)
  return {
      "inputs": inputs_BT.astype(np.int32),
      "targets": targets_BT.astype(np.int32),
      "segment_ids": np.cumsum(starts_BT, axis=1, dtype=np.int32),
      "positions": (np.arange(length) - last_start_BT).astype(np.int32),
      "weights": np.ones(inputs_BT.shape, np.float32),
  }


def from_examples(rows: Sequence[Sequence[Example]], seq_len: int) -> Rows:
  """Packs the examples of each row side by side, each its own segment, the rest padding (weight 0)."""
  batch = {name: np.zeros((len(rows), seq_len), np.int32) for name in INT_KEYS}
  batch["weights"] = np.zeros((len(rows), seq_len), np.float32)
  for row, examples in enumerate(rows):
    start = 0
    for segment, example in enumerate(examples, 1):
      end = start + len(example.inputs)
      batch["inputs"][row, start:end] = example.inputs
      batch["targets"][row, start:end] = example.targets
      batch["weights"][row, start:end] = example.weights
      batch["segment_ids"][row, start:end] = segment
      batch["positions"][row, start:end] = np.arange(end - start)
      start = end
  return batch
