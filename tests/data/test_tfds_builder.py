"""The TFDS builder: cleaning, exact dedup, splits, counts, and rebuilding only when it must."""

import collections
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm.config import ConfigError
from lm.data import sources, tfds_builder


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory):
  """Good documents next to a duplicate, a near-duplicate, binary, empty, latin-1, long and JSON lines, a link to
  nothing, a link to a file, and a link back to the top."""
  root = tmp_path_factory.mktemp("messy")
  good = [f"good document number {i}\nwith two lines {i * 7}\n" for i in range(30)]
  for i, text in enumerate(good):
    (root / f"good{i}.txt").write_text(text)
  (root / "copy_of_good0.md").write_text(good[0])  # exact duplicate: dropped
  (root / "near_good1.txt").write_text(good[1] + " ")  # one extra space: kept
  (root / "windows.txt").write_bytes(b"line one\r\nline two\r\n")  # kept, newlines normalized
  (root / "image.txt").write_bytes(bytes(range(256)) * 4)  # binary
  (root / "empty.txt").write_text("")
  (root / "blank.md").write_text(" \n\t\n")  # whitespace only: empty
  (root / "latin1.txt").write_bytes("café crème brûlée".encode("latin-1"))  # not UTF-8
  (root / "long.py").write_text("x = 1\n" * 500)  # 3000 chars: split into 3 pieces of 1000
  (root / "notes.bin").write_bytes(b"\x00\x01")  # not a text extension: never read
  (root / "gone.txt").symlink_to(root / "nowhere.txt")  # a link to nothing: unreadable
  (root / "linked").mkdir()
  (root / "linked" / "same_as_good2.txt").symlink_to(root / "good2.txt")  # the same file: read once
  (root / "linked" / "back_to_the_top").symlink_to(root, target_is_directory=True)  # a loop: not followed
  lines = [json.dumps({"text": "a json document"}), "{not json", json.dumps({"body": "wrong key"}), "", json.dumps({"text": "another one"})]
  latin1_line = json.dumps({"text": "café"}, ensure_ascii=False).encode("latin-1")  # not UTF-8
  (root / "records.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + latin1_line + b"\n")
  return root


@pytest.fixture(scope="module")
def built(messy_dir, tmp_path_factory, tiny_config):
  config = tiny_config(
      "llama",
      {
          "data.source": f"text:{messy_dir}",
          "data.data_dir": str(tmp_path_factory.mktemp("messy_data")),
          "data.tokenizer_vocab_size": 300,
          "data.validation_fraction": 0.3,
          "data.max_document_chars": 1000,
      },
  )
  tokenizer, builder = tfds_builder.prepare(config.data)
  return config, tokenizer, builder


def _stream_documents(builder, tokenizer, split):
  """The split's token stream, decoded and cut at EOS back into documents."""
  source = builder.as_data_source(split)
  tokens = np.concatenate([source[i]["tokens"] for i in range(len(source))])
  documents, start = [], 0
  for end in np.flatnonzero(tokens == tokenizer.eos_id):
    documents.append(tokenizer.decode(tokens[start:end]))
    start = end + 1
  assert start == len(tokens), "the stream ends with an EOS"
  return documents


def test_counts_what_was_skipped_split_and_deduplicated(built):
  _, _, builder = built
  meta = builder.info.metadata
  counts = [meta[name] for name in ("unreadable", "binary", "non_utf8", "empty", "malformed", "missing_text_key", "split")]
  assert counts == [1, 1, 2, 2, 1, 1, 1]
  assert meta["train_duplicates"] + meta["validation_duplicates"] == 1
  # 30 good + near-duplicate + windows + 3 pieces of long.py + 2 JSON documents
  assert meta["train_documents"] + meta["validation_documents"] == 37
  assert meta["train_documents"] > 0 and meta["validation_documents"] > 0
  assert "1 unreadable, 1 binary, 2 non_utf8, 1 malformed, 1 missing_text_key, 2 empty" in tfds_builder.summary(builder)


def test_streams_hold_exactly_the_cleaned_documents_once(built, messy_dir):
  config, tokenizer, builder = built
  documents = _stream_documents(builder, tokenizer, "train") + _stream_documents(builder, tokenizer, "validation")
  expected = list(tfds_builder.clean_documents(sources.from_config(config.data), 1000))
  assert collections.Counter(documents) == collections.Counter(set(expected))
  assert "line one\nline two\n" in documents
  assert (messy_dir / "near_good1.txt").read_text() in documents
  for split in tfds_builder.SPLITS:
    assert builder.info.metadata[f"{split}_tokens"] == sum(len(r["tokens"]) for r in builder.as_data_source(split))


def test_the_pieces_of_a_long_document_stay_in_one_split(built, messy_dir):
  _, tokenizer, builder = built
  pieces = tfds_builder.split_long((messy_dir / "long.py").read_text(), 1000)
  assert len(set(pieces)) == 3
  split, _ = tfds_builder.split_of((messy_dir / "long.py").read_text(), 0.3)  # decided by the whole document
  assert set(pieces) <= set(_stream_documents(builder, tokenizer, split))


def test_a_split_without_documents_is_left_out_and_training_needs_no_validation(tiny_config, tmp_path):
  from lm.train import loop

  for i in range(5):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
  overrides = {
      "data.source": f"text:{tmp_path}", "data.data_dir": str(tmp_path / "data"), "model.vocab_size": 0,
      "data.tokenizer_vocab_size": 300, "data.validation_fraction": 0.0, "data.seq_len": 16,
  }  # fmt: skip
  _, builder = tfds_builder.prepare(tiny_config("llama", overrides).data)
  assert builder.info.metadata["validation_tokens"] == 0 and builder.info.metadata["train_documents"] == 5
  assert "validation 0 documents / 0 tokens" in tfds_builder.summary(builder)
  with pytest.raises(ConfigError, match="^data.validation_fraction: the validation split"):
    loop.setup(tiny_config("llama", {**overrides, "eval.every": 5}))
  run = loop.setup(tiny_config("llama", {**overrides, "eval.every": 0}))
  assert next(run.train_batches())["inputs"].shape == (8, 16)


def test_split_is_a_stable_function_of_the_content():
  assert tfds_builder.split_of("some text", 0.5) == tfds_builder.split_of("some text", 0.5)
  splits = collections.Counter(tfds_builder.split_of(f"document {i}", 0.25)[0] for i in range(2000))
  assert 400 < splits["validation"] < 600


def test_a_given_tokenizer_is_used_and_named_in_the_build(built):
  config, tokenizer, builder = built
  given = config.copy_and_resolve_references()
  given.data.tokenizer = tokenizer.path
  given_tokenizer, _ = tfds_builder.prepare(given.data)
  assert given_tokenizer.path == tokenizer.path


def test_missing_text_folder_is_a_clear_error(tiny_config, tmp_path):
  config = tiny_config("llama", {"data.source": f"text:{tmp_path}/nothing_here", "data.data_dir": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="no .txt, .md, .py, .jsonl files"):
    tfds_builder.prepare(config.data)


# Last in the module: it changes a file of the shared corpus.
def test_same_inputs_reuse_the_build_and_changed_inputs_rebuild(built, messy_dir, tmp_path):
  config, tokenizer, builder = built
  again_tokenizer, again = tfds_builder.prepare(config.data)
  assert again.data_dir == builder.data_dir and again_tokenizer.path == tokenizer.path

  other_model = config.copy_and_resolve_references()
  other_model.model.num_layers = 7
  other_model.data.seq_len = 8
  assert tfds_builder.prepare(other_model.data)[1].data_dir == builder.data_dir

  (messy_dir / "good5.txt").write_text("changed content\n")
  changed_tokenizer, changed = tfds_builder.prepare(config.data)
  assert changed.data_dir != builder.data_dir  # the source changed: new tokenizer and new shards
  assert changed_tokenizer.path != tokenizer.path


class ToyText(tfds.core.GeneratorBasedBuilder):
  """A stand-in for a TFDS text dataset a user has prepared (lm1b, c4, ...)."""

  VERSION = tfds.core.Version("1.2.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"content": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(40):
      yield i, {"content": f"toy document {i}: " + "words " * (i % 7 + 1)}


def test_a_prepared_tfds_text_dataset_is_a_source(tiny_config, tmp_path):
  ToyText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  config = tiny_config(
      "llama",
      {
          "data.source": "tfds:toy_text:1.2.0",
          "data.tfds_data_dir": str(tmp_path / "tfds"),
          "data.text_key": "content",
          "data.data_dir": str(tmp_path / "lm"),
          "data.tokenizer_vocab_size": 300,
          "data.validation_fraction": 0.1,
      },
  )
  tokenizer, builder = tfds_builder.prepare(config.data)
  meta = builder.info.metadata
  assert meta["train_documents"] + meta["validation_documents"] == 40
  documents = _stream_documents(builder, tokenizer, "train") + _stream_documents(builder, tokenizer, "validation")
  assert "toy document 3: words words words words " in documents


def test_a_missing_tfds_dataset_is_a_clear_error(tiny_config, tmp_path):
  config = tiny_config("llama", {"data.source": "tfds:no_such_dataset", "data.tfds_data_dir": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="no_such_dataset"):
    tfds_builder.prepare(config.data)


def test_a_vocabulary_too_small_for_the_characters_names_the_field(tiny_config, messy_dir, tmp_path):
  config = tiny_config(
      "llama",
      {"data.source": f"text:{messy_dir}", "data.data_dir": str(tmp_path), "data.tokenizer_vocab_size": 261},
  )
  with pytest.raises(ConfigError, match="data.tokenizer_vocab_size"):
    tfds_builder.prepare(config.data)


def test_a_source_with_no_usable_documents_says_what_was_skipped(tmp_path, tiny_config):
  """Whether a tokenizer is trained on it or given: one line, not one blaming the vocabulary size."""
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "image.txt").write_bytes(bytes(range(256)))
  (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
  (tmp_path / "records.jsonl").write_text(json.dumps({"body": "the text is elsewhere"}) + "\n")
  config = tiny_config("llama", {"data.source": f"text:{tmp_path}", "data.data_dir": str(tmp_path / "data")})
  message = r"^data.source: .* has no usable documents; skipped 1 unreadable, 1 binary, 1 missing_text_key, 1 empty \(see data.text_key\)$"
  with pytest.raises(ConfigError, match=message):
    tfds_builder.prepare(config.data)


def test_a_glob_with_double_star_matches_as_glob_does_and_stops_at_a_link_loop(tmp_path):
  for path in ("top.md", "a/doc.md", "a/b/train/x.txt", "train/y.txt", "pretrain/p.txt", "mytrain/m.txt",
               "train/heldout/h.txt", "a/notes.md.bak"):  # fmt: skip
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(path)
  (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)

  def found(pattern):
    source = sources.text_files(str(tmp_path / pattern), "text")
    return sorted(os.path.relpath(where, tmp_path) for where, _ in source.documents())

  assert found("**/*.md") == ["a/doc.md", "top.md"]
  assert found("**/train/*.txt") == ["a/b/train/x.txt", "train/y.txt"]
  assert found("a/b/**/*.txt") == ["a/b/train/x.txt"]


@pytest.mark.parametrize("name, kind", [("tokenizer.json", "a Hugging Face tokenizer.json"), ("tokenizer.model", "a sentencepiece model")])
def test_a_given_tokenizer_that_cannot_be_read_is_a_config_error(tmp_path, tiny_config, corpus_dir, name, kind):
  (tmp_path / name).write_text('{"model": {"type": "BPE"}}')
  config = tiny_config("llama", {"data.source": f"text:{corpus_dir}", "data.tokenizer": str(tmp_path / name)})
  with pytest.raises(ConfigError, match=rf"^data.tokenizer: .*{name} is not {kind}$"):
    tfds_builder.prepare(config.data)
