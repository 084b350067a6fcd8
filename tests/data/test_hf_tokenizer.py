"""A Hugging Face tokenizer.json keeps every character as sentencepiece does, and offers the same methods."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lm import workdir as workdir_lib
from lm.config import ConfigError, UserError
from lm.data import tokenizer as tokenizer_lib

from conftest import make_document, train_byte_level_bpe  # tests/conftest.py

tokenizers = pytest.importorskip("tokenizers")

SOURCE_CODE = 'def f(x):\n\tif x:\r\n        return "▁ ok"  # ▁▁\n\n\n    pass\x00\x7f'
DOCUMENTS = [make_document(np.random.default_rng(1), i) for i in range(200)]


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory) -> dict:
  """A byte-level BPE in Llama 3's layout and one in GPT-2's."""
  styles = ("llama3", "gpt2")
  return {style: tokenizer_lib.load(train_byte_level_bpe(tmp_path_factory.mktemp(style), DOCUMENTS, style=style)) for style in styles}


@pytest.fixture(scope="module", params=["llama3", "gpt2"])
def tokenizer(request, hf_tokenizers):
  return hf_tokenizers[request.param]


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sentencepiece") / "bpe.model")
  return tokenizer_lib.train(iter(DOCUMENTS), path, vocab_size=320, model_type="bpe", sample_bytes=10**6)


def _raw(tokenizer) -> "tokenizers.Tokenizer":
  return tokenizers.Tokenizer.from_file(tokenizer.path)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_any_unicode_text_round_trips(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [SOURCE_CODE, "", " ", "\n", "  leading and trailing  ", "日本語 ✓ 🎉 ñ", "\u2581", "Ġ Ċ", "\ufeffbom",
     "<|end_of_text|>", "a<|begin_of_text|>b <|endoftext|>"],
)  # fmt: skip
def test_code_whitespace_and_special_token_text_round_trip(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert tokenizer.eos_id not in ids and tokenizer.bos_id not in ids  # a special token's text stays text


def test_encode_adds_no_special_tokens_whatever_the_post_processor_does(tokenizer):
  text = "the model reads = 12"
  ids = tokenizer.encode(text)
  with_post_processor = _raw(tokenizer).encode(text).ids
  if tokenizer.bos_id != tokenizer.eos_id:  # Llama 3's layout: its post-processor adds BOS
    assert with_post_processor == [tokenizer.bos_id] + ids
  else:
    assert with_post_processor == ids
  assert len(ids) < len(text.encode())  # merges were learned


def test_encode_batch_equals_encode(tokenizer):
  texts = [SOURCE_CODE, "plain words", "x\u2581y", ""]
  assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


def test_bos_and_eos_from_the_config_or_by_name(tokenizer):
  raw = _raw(tokenizer)
  if tokenizer.bos_id != tokenizer.eos_id:  # named by tokenizer_config.json
    assert (tokenizer.bos_id, tokenizer.eos_id) == (raw.token_to_id("<|begin_of_text|>"), raw.token_to_id("<|end_of_text|>"))
  else:  # GPT-2's one special token, found by its name
    assert tokenizer.eos_id == raw.token_to_id("<|endoftext|>") >= 0
  assert tokenizer.vocab_size == raw.get_vocab_size() > 300
  text = "loss falls = 7\n"
  assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]) == text


def test_tokenizer_config_decides_bos_and_eos(hf_tokenizers, tmp_path):
  tokenizer = hf_tokenizers["llama3"]
  shutil.copyfile(tokenizer.path, tmp_path / "tokenizer.json")
  config = {"bos_token": None, "eos_token": {"content": "<|eot_id|>", "special": True}}  # as transformers writes them
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  chat = tokenizer_lib.load(str(tmp_path / "tokenizer.json"))
  assert (chat.bos_id, chat.eos_id) == (-1, _raw(tokenizer).token_to_id("<|eot_id|>"))
  assert chat.fingerprint != tokenizer.fingerprint  # the documents would be joined with another token
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  with pytest.raises(UserError, match=r"tokenizer_config.json: its eos_token '<\|im_end\|>' is not in .*tokenizer.json$"):
    tokenizer_lib.load(str(tmp_path / "tokenizer.json"))


def test_token_id_of_both_kinds(tokenizer, sentencepiece):
  raw = _raw(tokenizer)
  if tokenizer.bos_id != tokenizer.eos_id:
    assert tokenizer.token_id("<|start_header_id|>") == raw.token_to_id("<|start_header_id|>") is not None
    assert tokenizer.token_id("<|eot_id|>") == raw.token_to_id("<|eot_id|>") is not None
  assert tokenizer.token_id("Ġmodel") == raw.token_to_id("Ġmodel") is not None  # a byte-level BPE's spelling
  assert tokenizer.token_id("<|no_such_token|>") is None
  assert (sentencepiece.token_id("</s>"), sentencepiece.token_id("<unk>")) == (sentencepiece.eos_id, 0) == (2, 0)
  assert sentencepiece.token_id("<0x41>") == 4 + 0x41  # the byte pieces follow <unk>, <s>, </s> and "\n"
  assert sentencepiece.token_id("<|start_header_id|>") is None
  assert sentencepiece.token_id("no such piece") is None


def test_load_picks_the_kind(tokenizer, sentencepiece, tmp_path):
  assert type(tokenizer_lib.load(tokenizer.path)) is tokenizer_lib.HfTokenizer
  assert type(tokenizer_lib.load(sentencepiece.path)) is tokenizer_lib.SentencePieceTokenizer
  assert type(tokenizer_lib.Tokenizer(sentencepiece.path)) is tokenizer_lib.SentencePieceTokenizer  # the old name
  assert tokenizer_lib.Tokenizer(tokenizer.path).fingerprint == tokenizer.fingerprint
  (tmp_path / "broken.json").write_text('{"model": {"type": "BPE"}}')
  with pytest.raises(UserError, match=r"broken.json is not a Hugging Face tokenizer.json$"):
    tokenizer_lib.load(str(tmp_path / "broken.json"))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    tokenizer_lib.load(str(tmp_path / "nope.json"))


def test_text_that_is_not_utf8_is_the_same_error_for_both_kinds(tokenizer, sentencepiece):
  messages = []
  for kind in (tokenizer, sentencepiece):
    with pytest.raises(UserError) as error:
      kind.encode("ok \udcff")
    messages.append(str(error.value))
  assert messages == ["text is not valid UTF-8 at character 4 (byte 0xff)"] * 2


def test_byte_lengths_add_up_to_the_text(tokenizer):
  lengths = tokenizer.byte_lengths(512)
  for text in (SOURCE_CODE, "日本語 ✓ 🎉 ñ", DOCUMENTS[0]):
    assert lengths[tokenizer.encode(text)].sum() == len(text.encode())
  assert lengths[tokenizer.eos_id] == lengths[tokenizer.bos_id] == 0
  assert not lengths[tokenizer.vocab_size :].any() and lengths[: tokenizer.vocab_size].max() > 1


def test_a_lossy_tokenizer_or_one_without_eos_is_refused(tokenizer, tmp_path):
  tokenizer.check_lossless("data.tokenizer")  # ours passes
  from tokenizers import models, pre_tokenizers, trainers

  words = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))  # split on whitespace, unknown characters lost
  words.pre_tokenizer = pre_tokenizers.Whitespace()
  words.train_from_iterator(DOCUMENTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False))
  (tmp_path / "lossy").mkdir()
  words.save(str(tmp_path / "lossy" / "words.json"))
  assert tokenizer_lib.load(str(tmp_path / "lossy" / "words.json")).eos_id == 1  # </s>: refused for what it loses
  (tmp_path / "no_eos").mkdir()
  shutil.copyfile(tokenizer.path, tmp_path / "no_eos" / "tokenizer.json")
  (tmp_path / "no_eos" / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
  for path in ("lossy/words.json", "no_eos/tokenizer.json"):
    with pytest.raises(ConfigError, match=f"^data.tokenizer: .*{path} is not a lossless tokenizer with an EOS"):
      tokenizer_lib.load(str(tmp_path / path)).check_lossless("data.tokenizer")


def test_a_workdir_keeps_one_tokenizer_of_its_kind(tokenizer, sentencepiece, tmp_path):
  assert workdir_lib.tokenizer_path(str(tmp_path)) is None
  assert sentencepiece.copy_to(str(tmp_path)) == workdir_lib.tokenizer_path(str(tmp_path)) == str(tmp_path / "tokenizer.model")
  kept_path = tokenizer.copy_to(str(tmp_path))
  assert kept_path == workdir_lib.tokenizer_path(str(tmp_path)) == str(tmp_path / "tokenizer.json")
  assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
  kept = tokenizer_lib.load(kept_path)
  assert (kept.fingerprint, kept.bos_id, kept.eos_id) == (tokenizer.fingerprint, tokenizer.bos_id, tokenizer.eos_id)
  sentencepiece.copy_to(str(tmp_path))
  assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer.model"]
