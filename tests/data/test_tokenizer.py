"""The tokenizer keeps every character of any UTF-8 text."""

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

from lm.config import ConfigError
from lm.data import tokenizer as tokenizer_lib

from conftest import make_document  # tests/conftest.py

SOURCE_CODE = 'def f(x):\n\tif x:\r\n        return "▁ ok"  # ▁▁\n\n\n    pass\x00\x7f'


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tokenizer(request, tmp_path_factory):
  rng = np.random.default_rng(1)
  documents = [make_document(rng, i) for i in range(200)]
  path = str(tmp_path_factory.mktemp("tokenizer") / f"{request.param}.model")
  return tokenizer_lib.train(iter(documents), path, vocab_size=320, model_type=request.param, sample_bytes=10**6)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_any_unicode_text_round_trips(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [SOURCE_CODE, "", " ", "\n", "  leading and trailing  ", "日本語 ✓ 🎉 ñ", "\u2581", "a\u2581b \u2581\u2581 c", "\ufeffbom"],
)
def test_code_whitespace_and_rare_characters_round_trip(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_batch_equals_encode(tokenizer):
  texts = [SOURCE_CODE, "plain words", "x\u2581y"]
  assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


def test_special_ids_and_vocab_size(tokenizer):
  assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
  assert 260 < tokenizer.vocab_size <= 320
  assert tokenizer.decode([tokenizer.eos_id]) == ""
  assert tokenizer.eos_id not in tokenizer.encode(SOURCE_CODE)


def test_loading_a_saved_model_gives_the_same_tokenizer(tokenizer):
  loaded = tokenizer_lib.Tokenizer(tokenizer.path)
  assert loaded.fingerprint == tokenizer.fingerprint
  assert loaded.encode(SOURCE_CODE) == tokenizer.encode(SOURCE_CODE)


def test_missing_model_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.Tokenizer(str(tmp_path / "nope.model"))


@pytest.mark.parametrize("size, multiple, padded", [(320, 128, 384), (384, 128, 384), (50257, 128, 50304), (5, 1, 5)])
def test_padded_vocab_size(size, multiple, padded):
  assert tokenizer_lib.padded_vocab_size(size, multiple) == padded


def test_a_given_tokenizer_that_loses_characters_is_refused(tokenizer, tmp_path):
  tokenizer.check_lossless("data.tokenizer")  # ours passes
  rng = np.random.default_rng(2)
  path = str(tmp_path / "lossy.model")
  # sentencepiece's defaults: NFKC normalization, collapsed whitespace, no byte fallback.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([make_document(rng, i) for i in range(200)]), model_prefix=path[: -len(".model")],
      vocab_size=300, minloglevel=2,
  )  # fmt: skip
  with pytest.raises(ConfigError, match="^data.tokenizer: .*lossy.model is not a lossless tokenizer"):
    tokenizer_lib.Tokenizer(path).check_lossless("data.tokenizer")
