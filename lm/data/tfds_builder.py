"""A TFDS builder: a source's documents, cleaned, deduplicated and tokenized, as array_record shards.

Each split is one token stream (documents joined with EOS) stored in records of CHUNK_TOKENS
tokens, so any window of the stream is read with one or two random accesses.
"""

import collections
import hashlib
import os
from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lm import distributed, workdir
from lm.config import ConfigError, UserError
from lm.data import sources, tokenizer as tokenizer_lib

CHUNK_TOKENS = 4096
SPLITS = ("train", "validation")
# Why a document was skipped: a file that could not be read, NUL bytes, not UTF-8, a .jsonl line that is not
# JSON, or has no string under data.text_key, nothing but whitespace.
SKIP_REASONS = ("unreadable", "binary", "non_utf8", "malformed", "missing_text_key", "empty")
_ENCODE_BATCH_CHARS = 4_000_000  # documents tokenized together, in parallel threads


def clean(raw: bytes | str | sources.Unusable) -> tuple[str | None, str | None]:
  """(text, None) for a usable document, else (None, reason) with reason in SKIP_REASONS."""
  if isinstance(raw, sources.Unusable):
    return None, raw.reason
  if isinstance(raw, bytes):
    if b"\x00" in raw:
      return None, "binary"
    try:
      raw = raw.decode("utf-8")
    except UnicodeDecodeError:
      return None, "non_utf8"
  try:
    raw.encode("utf-8")  # lone surrogates (from JSON escapes) are not UTF-8
  except UnicodeEncodeError:
    return None, "non_utf8"
  text = raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
  if not text.strip():
    return None, "empty"
  return text, None


def split_long(text: str, max_chars: int) -> list[str]:
  """`text` cut into pieces of at most `max_chars` characters."""
  return [text[start : start + max_chars] for start in range(0, len(text), max_chars)]


def split_of(text: str, validation_fraction: float) -> tuple[str, bytes]:
  """(split, content hash): the split is a stable function of the content, so duplicates share it."""
  digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
  in_validation = int.from_bytes(digest[:8], "big") < validation_fraction * 2**64
  return ("validation" if in_validation else "train"), digest[:16]


def skipped(counts: collections.Counter) -> str:
  """What was skipped and why, e.g. "3 unreadable, 2 missing_text_key", or "nothing"."""
  reasons = [*SKIP_REASONS, *(reason for reason in counts if reason not in SKIP_REASONS)]
  return ", ".join(f"{counts[reason]:,} {reason}" for reason in reasons if counts.get(reason)) or "nothing"


def whole_documents(source: sources.Source, counts: collections.Counter | None = None) -> Iterator[str]:
  """The source's usable documents, cleaned; `counts` tallies what was skipped and why.

  A source with none is a ConfigError that says what was skipped.
  """
  counts = collections.Counter() if counts is None else counts
  usable = 0
  for _, raw in source.documents():
    text, reason = clean(raw)
    if reason:
      counts[reason] += 1
      continue
    usable += 1
    yield text
  if not usable:
    missing_key = " (see data.text_key)" if counts.get("missing_text_key") else ""
    raise ConfigError(f"data.source: {source.slug} has no usable documents; skipped {skipped(counts)}{missing_key}")


def clean_documents(source: sources.Source, max_chars: int) -> Iterator[str]:
  """The source's usable documents, cleaned and cut to `max_chars`."""
  for text in whole_documents(source):
    yield from split_long(text, max_chars)


class TokenizedText(tfds.core.GeneratorBasedBuilder):
  """Token streams of a source under one tokenizer; the config name encodes both (and the cleaning)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "A long document's pieces stay in one split; a split with no documents is left out."}

  def __init__(
      self,
      *,
      source: sources.Source,
      tokenizer: tokenizer_lib.Tokenizer,
      validation_fraction: float,
      max_document_chars: int,
      data_dir: str,
  ):
    self._source = source
    self._tokenizer = tokenizer
    self._validation_fraction = validation_fraction
    self._max_document_chars = max_document_chars
    key = (source.fingerprint, tokenizer.fingerprint, validation_fraction, max_document_chars)
    name = f"{source.slug}-{hashlib.sha256(repr(key).encode()).hexdigest()[:12]}"
    config = tfds.core.BuilderConfig(name=name, description=f"{source.slug} tokenized by {tokenizer.path}")
    super().__init__(data_dir=data_dir, config=config, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Documents joined with EOS into one token stream per split, in fixed-size chunks.",
        features=tfds.features.FeaturesDict({"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # the records are the stream, in order
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = self._splits_with_documents()
    for split in SPLITS:
      if split not in splits:  # TFDS cannot write an empty split: it is left out, with zero counts
        for name in ("documents", "duplicates", "tokens"):
          self.info.metadata[f"{split}_{name}"] = 0
    return {split: self._generate_examples(split) for split in splits}

  def _splits_with_documents(self) -> list[str]:
    """The splits that get at least one document; reads only until every split that can has one."""
    possible = set(SPLITS) if self._validation_fraction > 0 else {"train"}
    found = set()
    for text in whole_documents(self._source):
      found.add(split_of(text, self._validation_fraction)[0])
      if found == possible:
        break
    return [split for split in SPLITS if split in found]

  def _generate_examples(self, split: str):
    counts = collections.Counter()
    seen = set()
    pending: list[str] = []
    pending_chars = 0
    stream: list[int] = []
    chunk_index = 0

    def drain(final: bool):
      nonlocal chunk_index
      end = len(stream) if final else len(stream) // CHUNK_TOKENS * CHUNK_TOKENS
      for start in range(0, end, CHUNK_TOKENS):
        yield chunk_index, {"tokens": np.asarray(stream[start : start + CHUNK_TOKENS], np.int32)}
        chunk_index += 1
      del stream[:end]  # once, not per chunk: cutting one chunk at a time would copy the rest each time

    def tokenize_pending():
      nonlocal pending, pending_chars
      for ids in self._tokenizer.encode_batch(pending):
        stream.extend(ids)
        stream.append(self._tokenizer.eos_id)
        counts["tokens"] += len(ids) + 1
      pending, pending_chars = [], 0

    # Split and deduplicate whole documents, then cut the long ones: a document's pieces stay together.
    for text in whole_documents(self._source, counts):
      counts["split"] += len(text) > self._max_document_chars
      document_split, digest = split_of(text, self._validation_fraction)
      if document_split != split:
        continue
      if digest in seen:
        counts["duplicates"] += 1
        continue
      seen.add(digest)
      pieces = split_long(text, self._max_document_chars)
      counts["documents"] += len(pieces)
      pending.extend(pieces)
      pending_chars += len(text)
      if pending_chars >= _ENCODE_BATCH_CHARS:
        tokenize_pending()
        yield from drain(final=False)
    tokenize_pending()
    yield from drain(final=True)

    for reason in (*SKIP_REASONS, "split"):
      self.info.metadata[reason] = counts[reason]  # the same in every split's pass over the source
    for name in ("documents", "duplicates", "tokens"):
      self.info.metadata[f"{split}_{name}"] = counts[name]


def prepare(data: ml_collections.ConfigDict, objective=None):
  """Trains (or loads) the tokenizer and builds the shards if they are missing; returns both.

  The shards hold a token stream (TokenizedText), or with an `objective` that reads .jsonl records,
  its examples (lm.data.examples.TokenizedExamples); the tokenizer is trained on the plain text.
  Process 0 builds first; the others wait, then find the shards (or build their own copy when the
  data directory is not shared).
  """
  from lm.data import examples  # it builds on this module

  data_dir = os.path.expanduser(data.data_dir)
  reads_examples = objective is not None and objective.reads_examples
  source = sources.from_config(data)

  def build() -> tuple[tokenizer_lib.Tokenizer, TokenizedText]:
    if os.path.isdir(data_dir) and not os.access(data_dir, os.W_OK):  # prepared elsewhere, read only here
      return build_unlocked()
    # A second run that needs the same files waits for the first to build them.
    with workdir.Lock(data_dir, "data preparation", wait=True, file_name="lm-prepare.lock"):
      return build_unlocked()

  def build_unlocked() -> tuple[tokenizer_lib.Tokenizer, TokenizedText]:
    tokenizer = load_or_train_tokenizer(data, source, data_dir, objective.reserved_pieces() if objective else [])
    if objective is not None:
      objective.check_tokenizer(tokenizer, data.seq_len)
    if reads_examples:
      builder = examples.TokenizedExamples(
          source=sources.from_config(data, records=True),
          tokenizer=tokenizer,
          objective=objective,
          seq_len=data.seq_len,
          validation_fraction=data.validation_fraction,
          data_dir=os.path.join(data_dir, "tfds"),
      )
    else:
      builder = TokenizedText(
          source=source,
          tokenizer=tokenizer,
          validation_fraction=data.validation_fraction,
          max_document_chars=data.max_document_chars,
          data_dir=os.path.join(data_dir, "tfds"),
      )
    if not builder.is_prepared():
      distributed.log(f"Tokenizing {data.source} into {builder.data_dir}")
      builder.download_and_prepare()
      distributed.log(examples.summary(builder) if reads_examples else summary(builder))
    return tokenizer, builder

  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils

  if jax.process_index() == 0:
    result = build()
  multihost_utils.sync_global_devices("lm.data.prepare")
  if jax.process_index() != 0:
    result = build()
  return result


def load_or_train_tokenizer(
    data: ml_collections.ConfigDict, source: sources.Source, data_dir: str, reserved_pieces: list[str] = ()
) -> tokenizer_lib.Tokenizer:
  """data.tokenizer if given, else the tokenizer trained on this source (trained now if missing), holding
  `reserved_pieces` (an objective's mask or sentinels) besides what it learns."""
  if data.tokenizer:
    try:
      tokenizer = tokenizer_lib.load(os.path.expanduser(data.tokenizer))
    except (OSError, UserError) as error:
      raise ConfigError(f"data.tokenizer: {error}") from None
    tokenizer.check_lossless("data.tokenizer")
    return tokenizer
  sampling = hashlib.sha256(repr((data.tokenizer_sample_bytes, data.max_document_chars)).encode()).hexdigest()[:8]
  reserved = "-" + hashlib.sha256("\n".join(reserved_pieces).encode()).hexdigest()[:8] if reserved_pieces else ""
  name = f"{source.slug}-{source.fingerprint}-{data.tokenizer_type}{data.tokenizer_vocab_size}-{sampling}{reserved}.model"
  path = os.path.join(data_dir, "tokenizers", name)
  if os.path.isfile(path):
    return tokenizer_lib.Tokenizer(path)
  distributed.log(f"Training a {data.tokenizer_vocab_size}-token {data.tokenizer_type} tokenizer on {data.source}")
  documents = clean_documents(source, data.max_document_chars)
  return tokenizer_lib.train(
      documents, path, data.tokenizer_vocab_size, data.tokenizer_type, data.tokenizer_sample_bytes, reserved_pieces
  )


def summary(builder: TokenizedText) -> str:
  """One line of what the build kept, skipped and split."""
  meta = builder.info.metadata
  kept = ", ".join(f"{split} {meta[f'{split}_documents']:,} documents / {meta[f'{split}_tokens']:,} tokens" for split in SPLITS)
  counts = collections.Counter({reason: meta.get(reason, 0) for reason in SKIP_REASONS})  # older builds count fewer
  dropped = f"{sum(meta[f'{split}_duplicates'] for split in SPLITS)} exact duplicates dropped"
  return f"Kept {kept}; skipped {skipped(counts)}; {dropped}; {meta['split']} long documents split."
