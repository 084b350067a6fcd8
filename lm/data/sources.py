"""Where documents come from: the built-in corpus, local text files, or a prepared TFDS dataset.

A source yields raw documents (bytes or str); cleaning and counting happen in the TFDS builder.
Its fingerprint changes when its documents may have changed, and only then.
"""

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
from typing import Callable, Iterator

import ml_collections

from lm.config import ConfigError

TEXT_EXTENSIONS = (".txt", ".md", ".py", ".jsonl")
_BUILTIN_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

Document = tuple[str, bytes | str | None]  # (where it came from, its raw content; None if unreadable)


@dataclasses.dataclass(frozen=True)
class Source:
  """A named, fingerprinted iterator of raw documents."""

  slug: str  # short readable name for file and dataset names
  fingerprint: str  # changes when the documents may have changed
  documents: Callable[[], Iterator[Document]]


def _hash(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _file_documents(paths: list[str], text_key: str) -> Iterator[Document]:
  """Each file is a document; each line of a .jsonl file is one, its text under `text_key`."""
  for path in paths:
    with open(path, "rb") as f:
      if not path.endswith(".jsonl"):
        yield path, f.read()
        continue
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{line_number}"
        try:
          line.decode("utf-8")
        except UnicodeDecodeError:
          yield where, line  # the cleaner counts it as not UTF-8
          continue
        try:
          text = json.loads(line)[text_key]
        except (ValueError, KeyError, TypeError):
          text = None
        yield where, text if isinstance(text, str) else None


def builtin() -> Source:
  """The Python standard library of this interpreter: its .py sources and text files, tests excluded."""
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = sorted(d for d in subdirectories if d not in _BUILTIN_SKIPPED_DIRS)
    paths += [os.path.join(directory, name) for name in sorted(files) if name.endswith((".py", ".txt"))]
  fingerprint = _hash("builtin", sys.version, root, len(paths))
  return Source(f"builtin-py{sys.version_info.major}{sys.version_info.minor}", fingerprint, lambda: _file_documents(paths, ""))


def text_files(pattern: str, text_key: str) -> Source:
  """Every .txt, .md, .py and .jsonl file under a directory (recursively) or matching a glob."""
  pattern = os.path.expanduser(pattern)
  if os.path.isdir(pattern):
    candidates = glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
  else:
    candidates = glob.glob(pattern, recursive=True)
  paths = sorted(p for p in candidates if os.path.isfile(p) and p.endswith(TEXT_EXTENSIONS))
  if not paths:
    raise FileNotFoundError(f"data.source: no {', '.join(TEXT_EXTENSIONS)} files at {pattern}")
  stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]
  slug = "text-" + "".join(c if c.isalnum() else "_" for c in os.path.basename(pattern.rstrip("/*")) or "files")[:40]
  return Source(slug, _hash("text", stats, text_key), lambda: _file_documents(paths, text_key))


def tfds_dataset(spec: str, data_dir: str, split: str, text_key: str) -> Source:
  """A TFDS text dataset already prepared (in array_record format) under `data_dir`."""
  import tensorflow_datasets as tfds

  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(spec, data_dir=data_dir)  # TFDS reads "name[/config][:version]"
  except Exception as error:  # TFDS raises several types for a name or version it cannot find
    raise FileNotFoundError(f"data.source: TFDS dataset {spec!r} not found under {data_dir or 'TFDS default dir'}: {error}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"data.source: TFDS dataset {spec!r} is not prepared under {builder.data_dir}; run tfds build first")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ConfigError(
        f"data.source: TFDS dataset {spec!r} is stored as {builder.info.file_format.value}; lm reads array_record "
        "(rebuild it with `tfds build --file_format=array_record`)"
    )

  def documents() -> Iterator[Document]:
    source = builder.as_data_source(split=split)
    for index in range(len(source)):
      text = source[index][text_key]
      yield f"{spec}[{index}]", text

  fingerprint = _hash("tfds", builder.info.full_name, str(builder.data_dir), split, text_key)
  return Source("tfds-" + builder.info.full_name.replace("/", "_"), fingerprint, documents)


def from_config(data: ml_collections.ConfigDict) -> Source:
  """The source named by data.source ("builtin", "text:<dir or glob>", "tfds:<name>[:<version>]")."""
  if data.source == "builtin":
    return builtin()
  if data.source.startswith("text:"):
    return text_files(data.source[len("text:") :], data.text_key)
  if data.source.startswith("tfds:"):
    return tfds_dataset(data.source[len("tfds:") :], data.tfds_data_dir, data.tfds_split, data.text_key)
  raise ValueError(f"data.source: unknown source {data.source!r}")
