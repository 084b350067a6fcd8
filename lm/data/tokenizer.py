"""Lossless sentencepiece tokenizers: train one on a sample of the source, or load a given .model.

Lossless means decode(encode(text)) == text for any UTF-8 text, code included: identity
normalization, no dummy prefix, whitespace kept, unknown characters spelled as UTF-8 bytes.
"""

import hashlib
import io
import os
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from lm.config import ConfigError, UserError

# sentencepiece writes a space as U+2581 inside pieces and turns every U+2581 back into a space
# when decoding, so a literal U+2581 in the text is encoded as its UTF-8 bytes instead.
_SPACE_MARK = "\u2581"


class Tokenizer:
  """A sentencepiece model with the encode / decode that keep every character."""

  def __init__(self, model_path: str):
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"tokenizer model {model_path} not found")
    with open(model_path, "rb") as f:
      model_proto = f.read()
    self.path = model_path
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:12]
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, ValueError):  # sentencepiece cannot parse it
      raise UserError(f"{model_path} is not a sentencepiece model") from None
    self.vocab_size: int = self._sp.vocab_size()
    self.bos_id: int = self._sp.bos_id()
    self.eos_id: int = self._sp.eos_id()
    self._space_mark_ids = [self._sp.piece_to_id(f"<0x{byte:02X}>") for byte in _SPACE_MARK.encode()]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS or EOS added); text that is not UTF-8 is a UserError."""
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates: from JSON escapes, or bytes that were not UTF-8
      # Python keeps a byte that is not UTF-8 (in argv, say) as the surrogate U+DC00 + byte.
      bad = " ".join(f"byte 0x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"U+{ord(c):04X}" for c in text[error.start : error.end])
      raise UserError(f"text is not valid UTF-8 at character {error.start + 1} ({bad})") from None
    if _SPACE_MARK not in text:
      return self._sp.encode(text)
    ids = []
    for i, part in enumerate(text.split(_SPACE_MARK)):
      if i:
        ids += self._space_mark_ids
      ids += self._sp.encode(part)
    return ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """encode() of each text, in parallel sentencepiece threads (one per core)."""
    if any(_SPACE_MARK in text for text in texts):
      return [self.encode(text) for text in texts]
    return self._sp.encode(texts, num_threads=os.cpu_count())

  def byte_lengths(self, padded_vocab_size: int) -> np.ndarray:
    """[padded_vocab_size] int32: UTF-8 bytes of text each id stands for (0 for BOS, EOS and padding ids)."""
    lengths = np.zeros(padded_vocab_size, np.int32)
    for piece_id in range(self.vocab_size):
      if self._sp.is_byte(piece_id):
        lengths[piece_id] = 1
      elif not (self._sp.is_control(piece_id) or self._sp.is_unknown(piece_id)):
        lengths[piece_id] = len(self._sp.id_to_piece(piece_id).replace(_SPACE_MARK, " ").encode())
    return lengths

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; BOS and EOS decode to nothing."""
    return self._sp.decode(list(ids))

  def check_lossless(self, field: str) -> None:
    """Raises ConfigError on `field` unless this model keeps every character and has an EOS to join documents."""
    probe = "  two spaces,\ttab\r\nÜñï 😀 \u2581 \x01 end "
    if self.eos_id < 0 or self.decode(self.encode(probe)) != probe:
      raise ConfigError(
          f"{field}: {self.path} is not a lossless tokenizer with an EOS piece (it needs byte fallback, identity "
          "normalization, no dummy prefix and an eos_id); leave the field empty to train one"
      )


def train(
    documents: Iterator[str], model_path: str, vocab_size: int, model_type: str, sample_bytes: int
) -> Tokenizer:
  """Trains a lossless tokenizer of at most `vocab_size` pieces on the first `sample_bytes` of `documents`.

  Saves it to `model_path`.
  """

  sampled_bytes = 0
  failure = None  # an error reading the documents, which sentencepiece would report as its own

  def sample() -> Iterator[str]:
    nonlocal sampled_bytes, failure
    try:
      for document in documents:
        yield document
        sampled_bytes += len(document.encode())
        if sampled_bytes >= sample_bytes:
          return
    except Exception as error:
      failure = error

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sample(),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
        byte_fallback=True,  # any character outside the vocabulary is spelled in bytes, never <unk>
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,  # runs of indentation become single tokens
        split_digits=True,
        user_defined_symbols=["\n"],
        max_sentence_length=1 << 24,  # a "sentence" here is a whole document
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=os.cpu_count(),
        minloglevel=2,
    )
  except RuntimeError as error:  # sentencepiece's way of saying the vocabulary cannot hold the characters
    if failure:
      raise failure from None
    if sampled_bytes == 0:
      raise ConfigError("data.source: no usable documents to train a tokenizer on (all empty, binary or not UTF-8)") from None
    raise ConfigError(f"data.tokenizer_vocab_size: {vocab_size} pieces cannot be trained on this text ({error})") from None
  if failure:  # sentencepiece took the documents read before it as all there were
    raise failure
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  partial_path = f"{model_path}.partial-{os.getpid()}"
  with open(partial_path, "wb") as f:
    f.write(model.getvalue())
  os.replace(partial_path, model_path)  # a killed run never leaves a truncated model behind
  return Tokenizer(model_path)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
  """`vocab_size` rounded up to a multiple of `multiple` (embedding tables of such sizes run faster)."""
  return -(-vocab_size // multiple) * multiple
