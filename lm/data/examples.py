"""Examples for the objectives that learn from .jsonl records (SFT, classification), and their packing.

A TFDS builder turns each usable record into one tokenized example (lm.objectives.Example: inputs,
targets, weights, at most data.seq_len long), split and deduplicated by content as documents are.
Rows are packed greedily, in the order of a permutation drawn per epoch from (data.seed, epoch):
an example goes into the current row if it fits, else it starts the next. So the rows of step k
are a pure function of (seed, k), and no example is ever split between rows. A row holds at most
model.cudnn_max_documents examples on every platform (cuDNN keeps only that many segments apart), so
the rows are the same wherever the run resumes.
"""

import collections
import hashlib
import json
import threading

import numpy as np
import tensorflow_datasets as tfds

from lm.config import ConfigError
from lm.data import sources, tfds_builder
from lm.objectives import Example, Objective


# Why a record is no example, counted per split: not what the objective reads, a label not of its classes, or
# (SFT) a prompt so long that no response token fits in data.seq_len.
EXAMPLE_SKIP_REASONS = ("not_an_example", "bad_label", "no_response")


class TokenizedExamples(tfds.core.GeneratorBasedBuilder):
  """The examples an objective makes of a source's records, under one tokenizer and row length."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source: sources.Source, tokenizer, objective: Objective, seq_len: int, validation_fraction: float, data_dir: str):
    self._source = source
    self._tokenizer = tokenizer
    self._objective = objective
    self._seq_len = seq_len
    self._validation_fraction = validation_fraction
    key = (source.fingerprint, tokenizer.fingerprint, objective.name, objective.config.to_json(sort_keys=True), seq_len, validation_fraction)
    name = f"{source.slug}-{objective.name}-{hashlib.sha256(repr(key).encode()).hexdigest()[:12]}"
    config = tfds.core.BuilderConfig(name=name, description=f"{objective.name} examples of {source.slug} by {tokenizer.path}")
    super().__init__(data_dir=data_dir, config=config, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="One tokenized example per record: inputs, targets and weights, at most seq_len long.",
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "targets": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "weights": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # packing reads them by index, in an order of its own
    )

  def _records(self, counts: collections.Counter):
    """(split, content hash, record) of each usable JSON object; `counts` tallies what was skipped."""
    for text in tfds_builder.whole_documents(self._source, counts):
      try:
        record = json.loads(text)
      except ValueError:
        counts["malformed"] += 1
        continue
      split, digest = tfds_builder.split_of(json.dumps(record, sort_keys=True), self._validation_fraction)
      yield split, digest, record

  def _example(self, record):
    """The objective's example of a record, or why there is none."""
    return self._objective.example(record, self._tokenizer, self._seq_len) if isinstance(record, dict) else "not_an_example"

  def _split_generators(self, dl_manager):
    del dl_manager
    # The splits that get at least one example; reads only until every split that can has one.
    possible = set(tfds_builder.SPLITS) if self._validation_fraction > 0 else {"train"}
    found, counts = set(), collections.Counter()
    for split, _, record in self._records(counts):
      if split not in found:
        example = self._example(record)
        counts[example if isinstance(example, str) else "usable"] += 1
        if not isinstance(example, str):
          found.add(split)
          if found == possible:
            break
    if "train" not in found:  # then every record was read: the counts are whole
      raise ConfigError(
          f"data.source: {self._source.slug} has no {self._objective.name} examples for training; skipped "
          f"{tfds_builder.skipped(counts)} (the records it reads: lm/objectives/{self._objective.name}.py)"
      )
    splits = [split for split in tfds_builder.SPLITS if split in found]
    for split in tfds_builder.SPLITS:
      if split not in splits:  # TFDS cannot write an empty split: it is left out, with zero counts
        self.info.metadata[f"{split}_examples"] = 0
        self.info.metadata[f"{split}_lengths"] = []
        self.info.metadata[f"{split}_duplicates"] = 0
        for reason in (*EXAMPLE_SKIP_REASONS, "cut"):
          self.info.metadata[f"{split}_{reason}"] = 0
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split: str):
    counts = collections.Counter()
    seen, lengths = set(), []
    for record_split, digest, record in self._records(counts):
      if record_split != split:
        continue
      if digest in seen:
        counts["duplicates"] += 1
        continue
      seen.add(digest)
      example = self._example(record)
      if isinstance(example, str):
        counts[f"{split}_{example}"] += 1
        continue
      counts[f"{split}_cut"] += example.cut
      yield len(lengths), {"inputs": example.inputs, "targets": example.targets, "weights": example.weights}
      lengths.append(len(example.inputs))
    for reason in tfds_builder.SKIP_REASONS:
      self.info.metadata[reason] = counts[reason]  # the same in every split's pass over the source
    for reason in (*EXAMPLE_SKIP_REASONS, "cut"):
      self.info.metadata[f"{split}_{reason}"] = counts[f"{split}_{reason}"]  # of this split's records only
    self.info.metadata[f"{split}_examples"] = len(lengths)
    self.info.metadata[f"{split}_lengths"] = lengths
    self.info.metadata[f"{split}_duplicates"] = counts["duplicates"]


def summary(builder: TokenizedExamples) -> str:
  """One line of what the build kept, skipped and cut."""
  meta = builder.info.metadata
  total = lambda name: sum(meta.get(f"{split}_{name}", 0) for split in tfds_builder.SPLITS)
  kept = ", ".join(f"{split} {meta[f'{split}_examples']:,} examples" for split in tfds_builder.SPLITS)
  counts = collections.Counter({reason: meta.get(reason, 0) for reason in tfds_builder.SKIP_REASONS})
  counts.update({reason: total(reason) for reason in EXAMPLE_SKIP_REASONS})
  return (
      f"Kept {kept}; skipped {tfds_builder.skipped(counts)}; {total('duplicates')} exact duplicates dropped; "
      f"{total('cut')} examples longer than data.seq_len cut"
  )


def pack(lengths: np.ndarray, order: np.ndarray, seq_len: int, max_examples: int) -> list[np.ndarray]:
  """The examples (indices) of each row: in `order`, each into the current row if it fits (at most
  `max_examples` in a row), else the next."""
  rows, current, used = [], [], 0
  for index in order.tolist():
    if current and (used + lengths[index] > seq_len or len(current) == max_examples):
      rows.append(np.asarray(current))
      current, used = [], 0
    current.append(index)
    used += lengths[index]
  if current:
    rows.append(np.asarray(current))
  return rows


class PackedRows:
  """The rows of a split: with a seed, endless, each epoch packed in its own order; without, one pass in order."""

  def __init__(self, builder: TokenizedExamples, split: str, seq_len: int, seed: int | None, max_examples: int):
    self._records = builder.as_data_source(split) if builder.info.metadata[f"{split}_examples"] else []
    self._lengths = np.asarray(builder.info.metadata[f"{split}_lengths"], np.int64)
    self._seq_len = seq_len
    self._max_examples = max_examples
    self._seed = seed
    self._epochs: list[list[np.ndarray]] = []  # the rows of epochs 0, 1, ..., as far as asked
    self._first_row: list[int] = [0]  # global index of each epoch's first row, and of the next one's
    self._lock = threading.Lock()  # grain builds batches in several threads

  def _epoch(self, epoch: int) -> list[np.ndarray]:
    with self._lock:
      while len(self._epochs) <= epoch:
        number = len(self._epochs)
        order = np.arange(len(self._lengths)) if self._seed is None else np.random.default_rng([self._seed, number]).permutation(len(self._lengths))
        self._epochs.append(pack(self._lengths, order, self._seq_len, self._max_examples))
        self._first_row.append(self._first_row[-1] + len(self._epochs[-1]))
      return self._epochs[epoch]

  def __len__(self) -> int:
    """Rows in one epoch (in order, without a seed)."""
    return len(self._epoch(0))

  def row(self, index: int) -> list[Example]:
    """The examples of row `index`: of the endless sequence with a seed; past the end without one, none (padding)."""
    if self._seed is None:
      rows = self._epoch(0)
      indices = rows[index] if index < len(rows) else []
    else:
      epoch = 0
      while index >= self._first_row[epoch] + len(self._epoch(epoch)):
        epoch += 1
      indices = self._epochs[epoch][index - self._first_row[epoch]]
    return [Example(**self._records[int(i)]) for i in indices]
