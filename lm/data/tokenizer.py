"""Lossless tokenizers: sentencepiece (trained on a sample of the source, or a given .model) or a given
Hugging Face tokenizer.json (byte-level BPE, as Llama 3 and GPT-2 ship). `load(path)` opens either.

Lossless means decode(encode(text)) == text for any UTF-8 text, code included: identity
normalization, no dummy prefix, whitespace kept, unknown characters spelled as UTF-8 bytes
(sentencepiece's byte fallback, or a byte-level BPE's alphabet of all 256 bytes).
"""

import hashlib
import io
import json
import os
import shutil
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from lm.config import ConfigError, UserError

# sentencepiece writes a space as U+2581 inside pieces and turns every U+2581 back into a space
# when decoding, so a literal U+2581 in the text is encoded as its UTF-8 bytes instead.
_SPACE_MARK = "\u2581"
HF_CONFIG_FILE = "tokenizer_config.json"  # beside a tokenizer.json: its bos_token and eos_token
# A tokenizer.json's BOS and EOS when no tokenizer_config.json names them: Llama 3's, Llama 2's, GPT-2's.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>")


def _check_utf8(text: str) -> None:
  """Raises a UserError naming the first character of `text` that is not UTF-8 (a lone surrogate)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as error:  # lone surrogates: from JSON escapes, or bytes that were not UTF-8
    # Python keeps a byte that is not UTF-8 (in argv, say) as the surrogate U+DC00 + byte.
    bad = " ".join(f"byte 0x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"U+{ord(c):04X}" for c in text[error.start : error.end])
    raise UserError(f"text is not valid UTF-8 at character {error.start + 1} ({bad})") from None


class Tokenizer:
  """What every kind offers. `Tokenizer(path)` opens the kind of file `path` is, as `load` does."""

  FILE_NAME: str  # the name a copy of this kind gets (in a workdir, or a Hugging Face folder)
  _FILES: tuple[str, ...]  # every file a copy of this kind writes
  _LOSSLESS_NEEDS: str  # what check_lossless asks of this kind
  path: str
  fingerprint: str  # changes whenever the ids of some text would
  vocab_size: int
  bos_id: int  # -1: none
  eos_id: int  # -1: none

  def __new__(cls, *args, **kwargs):
    if cls is Tokenizer:  # Tokenizer(path), as pathlib.Path(...) gives a PosixPath
      path = args[0] if args else kwargs["path"]
      cls = HfTokenizer if os.fspath(path).endswith(".json") else SentencePieceTokenizer
    return super().__new__(cls)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS or EOS added); text that is not UTF-8 is a UserError."""
    raise NotImplementedError

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """encode() of each text, in parallel threads."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; BOS, EOS and other special tokens decode to nothing."""
    raise NotImplementedError

  def token_id(self, piece: str) -> int | None:
    """The id of a piece or special token as the vocabulary spells it ("<|eot_id|>"), None if it has none."""
    raise NotImplementedError

  def byte_lengths(self, padded_vocab_size: int) -> np.ndarray:
    """[padded_vocab_size] int32: UTF-8 bytes of text each id stands for (0 for BOS, EOS and padding ids)."""
    raise NotImplementedError

  def copy_to(self, folder: str) -> str:
    """Copies the tokenizer into `folder` as FILE_NAME (replacing a copy of another kind there); returns its path."""
    raise NotImplementedError

  def check_lossless(self, field: str) -> None:
    """Raises ConfigError on `field` unless this tokenizer keeps every character and has an EOS to join documents."""
    probe = "  two spaces,\ttab\r\nÜñï 😀 \u2581 \x01 end "
    if self.eos_id < 0 or self.decode(self.encode(probe)) != probe:
      raise ConfigError(
          f"{field}: {self.path} is not a lossless tokenizer with an EOS piece (it needs {self._LOSSLESS_NEEDS}); "
          "leave the field empty to train one"
      )

  def _remove_other_kinds(self, folder: str) -> None:
    """Removes a copy of another kind from `folder`, so that it holds one tokenizer."""
    for kind in (SentencePieceTokenizer, HfTokenizer):
      if kind is not type(self):
        for name in kind._FILES:
          if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def load(path: str) -> Tokenizer:
  """The tokenizer in `path`: a Hugging Face tokenizer.json (any name ending in .json), else a sentencepiece model."""
  return Tokenizer(path)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model with the encode / decode that keep every character."""

  FILE_NAME = "tokenizer.model"
  _FILES = (FILE_NAME,)
  _LOSSLESS_NEEDS = "byte fallback, identity normalization, no dummy prefix and an eos_id"

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer model {path} not found")
    with open(path, "rb") as f:
      model_proto = f.read()
    self.path = path
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:12]
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, ValueError):  # sentencepiece cannot parse it
      raise UserError(f"{path} is not a sentencepiece model") from None
    self.vocab_size: int = self._sp.vocab_size()
    self.bos_id: int = self._sp.bos_id()
    self.eos_id: int = self._sp.eos_id()
    self._space_mark_ids = [self._sp.piece_to_id(f"<0x{byte:02X}>") for byte in _SPACE_MARK.encode()]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS or EOS added); text that is not UTF-8 is a UserError."""
    _check_utf8(text)
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

  def token_id(self, piece: str) -> int | None:
    """The id of `piece` ("</s>", "<0x41>", "▁the"), None if the model has no such piece."""
    piece_id = self._sp.piece_to_id(piece)
    return piece_id if self._sp.id_to_piece(piece_id) == piece else None  # an unknown piece gets unk's id

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

  def copy_to(self, folder: str) -> str:
    """Copies the model into `folder` as tokenizer.model (replacing a tokenizer.json there); returns its path."""
    target = os.path.join(folder, self.FILE_NAME)
    if os.path.abspath(target) != os.path.abspath(self.path):
      shutil.copyfile(self.path, target)
    self._remove_other_kinds(folder)
    return target


class HfTokenizer(Tokenizer):
  """A Hugging Face tokenizer.json, through the tokenizers library.

  BOS and EOS are the bos_token and eos_token of a tokenizer_config.json beside it, else the tokens
  of _BOS_NAMES and _EOS_NAMES it has. Text is always text: "<|eot_id|>" in it is never that token.
  """

  FILE_NAME = "tokenizer.json"
  _FILES = (FILE_NAME, HF_CONFIG_FILE)
  _LOSSLESS_NEEDS = (
      "a byte-level BPE that does not normalize text, and an eos_token in a tokenizer_config.json beside it or a "
      f"token named {', '.join(_EOS_NAMES)}"
  )

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer {path} not found")
    try:
      import tokenizers
    except ImportError:
      raise UserError(f"{path}: Hugging Face tokenizers need the tokenizers package (pip install tokenizers)") from None
    with open(path, "rb") as f:
      content = f.read()
    self.path = path
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(content.decode())
      decoder = json.loads(content).get("decoder") or {}
    except Exception:  # tokenizers raises a plain Exception for a file it cannot read
      raise UserError(f"{path} is not a Hugging Face tokenizer.json") from None
    # Special tokens' text in a document stays text, as sentencepiece keeps "</s>"; chat templates use token_id.
    self._tokenizer.encode_special_tokens = True
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    self._byte_level = any(d and d.get("type") == "ByteLevel" for d in decoders)
    self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    self._config = self._read_config()
    self.bos_id = self._special_id("bos_token", _BOS_NAMES)
    self.eos_id = self._special_id("eos_token", _EOS_NAMES)
    marks = f"\0bos={self.bos_id} eos={self.eos_id}".encode()  # a new EOS changes the documents' token stream
    self.fingerprint = hashlib.sha256(content + marks).hexdigest()[:12]

  def _read_config(self) -> dict:
    """The tokenizer_config.json beside the tokenizer.json, {} if there is none."""
    config_path = os.path.join(os.path.dirname(self.path), HF_CONFIG_FILE)
    if not os.path.isfile(config_path):
      return {}
    try:
      with open(config_path) as f:
        config = json.load(f)
    except (OSError, ValueError) as error:
      raise UserError(f"{config_path} cannot be read as JSON ({error})") from None
    if not isinstance(config, dict):
      raise UserError(f"{config_path} is not a JSON object")
    return config

  def _special_id(self, key: str, names: tuple[str, ...]) -> int:
    """The id of the config's `key` (bos_token / eos_token; null: none), else of the first of `names` it has; -1: none."""
    if key not in self._config:
      ids = (self._tokenizer.token_to_id(name) for name in names)
      return next((token_id for token_id in ids if token_id is not None), -1)
    token = self._config[key]
    if isinstance(token, dict):  # an AddedToken, as transformers writes one
      token = token.get("content")
    if token is None:
      return -1
    token_id = self._tokenizer.token_to_id(token) if isinstance(token, str) else None
    if token_id is None:
      config_path = os.path.join(os.path.dirname(self.path), HF_CONFIG_FILE)
      raise UserError(f"{config_path}: its {key} {token!r} is not in {self.path}")
    return token_id

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS or EOS added, whatever the post-processor says); not UTF-8: a UserError."""
    _check_utf8(text)
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """encode() of each text, in the tokenizers library's threads."""
    for text in texts:
      _check_utf8(text)
    return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; BOS, EOS and other special tokens decode to nothing."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_id(self, piece: str) -> int | None:
    """The id of a token as the vocabulary spells it ("<|eot_id|>", or "Ġthe" in a byte-level BPE), None if none."""
    return self._tokenizer.token_to_id(piece)

  def byte_lengths(self, padded_vocab_size: int) -> np.ndarray:
    """[padded_vocab_size] int32: UTF-8 bytes of text each id stands for (0 for special tokens and padding ids)."""
    from tokenizers import pre_tokenizers

    byte_chars = set(pre_tokenizers.ByteLevel.alphabet()) if self._byte_level else set()
    special = {token_id for token_id, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
    lengths = np.zeros(padded_vocab_size, np.int32)
    for token, token_id in self._tokenizer.get_vocab(with_added_tokens=True).items():
      if token_id in special:
        continue
      if self._byte_level:  # each character of the byte-level alphabet is one byte; others are themselves
        lengths[token_id] = sum(1 if c in byte_chars else len(c.encode()) for c in token)
      elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # a byte-fallback token
        lengths[token_id] = 1
      else:
        lengths[token_id] = len(token.replace(_SPACE_MARK, " ").encode())
    return lengths

  def copy_to(self, folder: str) -> str:
    """Copies tokenizer.json into `folder`, with a tokenizer_config.json naming its BOS and EOS; returns its path."""
    target = os.path.join(folder, self.FILE_NAME)
    if os.path.abspath(target) != os.path.abspath(self.path):
      shutil.copyfile(self.path, target)
    config = {**self._config, "bos_token": self._token(self.bos_id), "eos_token": self._token(self.eos_id)}
    with open(os.path.join(folder, HF_CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
    self._remove_other_kinds(folder)
    return target

  def _token(self, token_id: int) -> str | None:
    return self._tokenizer.id_to_token(token_id) if token_id >= 0 else None


def train(
    documents: Iterator[str], model_path: str, vocab_size: int, model_type: str, sample_bytes: int,
    reserved_pieces: Iterable[str] = (),
) -> SentencePieceTokenizer:
  """Trains a lossless tokenizer of at most `vocab_size` pieces on the first `sample_bytes` of `documents`,
  `reserved_pieces` among them (an objective's mask or sentinels: whole pieces, wherever their text appears).

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
        user_defined_symbols=["\n", *reserved_pieces],
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
  return SentencePieceTokenizer(model_path)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
  """`vocab_size` rounded up to a multiple of `multiple` (embedding tables of such sizes run faster)."""
  return -(-vocab_size // multiple) * multiple
