"""Where documents come from: the built-in corpus, local text files, or a prepared TFDS dataset.

A source yields raw documents (bytes or str); cleaning and counting happen in the TFDS builder.
Its fingerprint changes when its documents may have changed, and only then.
"""

import ast
import dataclasses
import fnmatch
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



@dataclasses.dataclass(frozen=True)
class Unusable:
  """In place of a document's content: why there is none (one of tfds_builder.SKIP_REASONS)."""

  reason: str


Document = tuple[str, bytes | str | Unusable]  # (where it came from, its raw content)


@dataclasses.dataclass(frozen=True)
class Source:
  """A named, fingerprinted iterator of raw documents."""

  slug: str  # short readable name for file and dataset names
  fingerprint: str  # changes when the documents may have changed
  documents: Callable[[], Iterator[Document]]


def _hash(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _file_documents(paths: list[str], text_key: str | None) -> Iterator[Document]:
  """Each file is a document; each line of a .jsonl file is one, its text under `text_key` (None: the whole
  line, a record for an objective to read)."""
  for path in paths:
    try:
      with open(path, "rb") as f:
        content = f.read()
    except OSError:  # no permission, a link to nothing, a file gone since it was listed
      yield path, Unusable("unreadable")
      continue
    if not path.endswith(".jsonl"):
      yield path, content
      continue
    for line_number, line in enumerate(content.splitlines(), 1):
      if not line.strip():
        continue
      yield f"{path}:{line_number}", line if text_key is None else _jsonl_text(line, text_key)


def _jsonl_text(line: bytes, text_key: str) -> bytes | str | Unusable:
  """The text under `text_key` of one .jsonl line."""
  try:
    line.decode("utf-8")
  except UnicodeDecodeError:
    return line  # the cleaner counts it as not UTF-8
  try:
    record = json.loads(line)
  except ValueError:
    return Unusable("malformed")
  if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
    return Unusable("missing_text_key")
  return record[text_key]


def _walk(root: str) -> Iterator[str]:
  """Every file under `root`, each real file once: links are followed, but never into a folder already seen."""
  seen_folders, seen_files = set(), set()
  for directory, subdirectories, files in os.walk(root, followlinks=True):
    folder = os.stat(directory)
    if (folder.st_dev, folder.st_ino) in seen_folders:  # a link back into the tree: stop here
      subdirectories[:] = []
      continue
    seen_folders.add((folder.st_dev, folder.st_ino))
    subdirectories.sort()
    for name in sorted(files):
      path = os.path.join(directory, name)
      try:
        file = os.stat(path)
      except OSError:  # a link to nothing: left for the reader to count as unreadable
        yield path
        continue
      if (file.st_dev, file.st_ino) not in seen_files:
        seen_files.add((file.st_dev, file.st_ino))
        yield path


def _stdlib_files(extensions: tuple[str, ...]) -> tuple[str, list[str]]:
  """(the standard library's folder, its files with these extensions, tests excluded), in a stable order."""
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = sorted(d for d in subdirectories if d not in _BUILTIN_SKIPPED_DIRS)
    paths += [os.path.join(directory, name) for name in sorted(files) if name.endswith(extensions)]
  return root, paths


def builtin() -> Source:
  """The Python standard library of this interpreter: its .py sources and text files, tests excluded."""
  root, paths = _stdlib_files((".py", ".txt"))
  fingerprint = _hash("builtin", sys.version, root, len(paths))
  return Source(f"builtin-py{sys.version_info.major}{sys.version_info.minor}", fingerprint, lambda: _file_documents(paths, ""))


def _signature(function: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """The `def` line of a function, as its source would have it with one line of arguments."""
  returns = f" -> {ast.unparse(function.returns)}" if function.returns else ""
  prefix = "async def" if isinstance(function, ast.AsyncFunctionDef) else "def"
  return f"{prefix} {function.name}({ast.unparse(function.args)}){returns}:"


def _docstring_pairs(paths: list[str]) -> Iterator[Document]:
  """{"prompt": a public function's docstring (first paragraph), "response": its def line}, as JSON."""
  for path in paths:
    try:
      with open(path, "rb") as f:
        tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):  # unreadable, or Python of another version
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
        docstring = ast.get_docstring(node)
        if docstring:
          paragraph = docstring.strip().split("\n\n")[0]
          yield f"{path}:{node.lineno}", json.dumps({"prompt": paragraph, "response": _signature(node)})


def builtin_chats() -> Source:
  """Prompt/response pairs from this Python's standard library: a function's docstring, then its signature."""
  root, paths = _stdlib_files((".py",))
  fingerprint = _hash("builtin_chats", sys.version, root, len(paths))
  slug = f"builtin-chats-py{sys.version_info.major}{sys.version_info.minor}"
  return Source(slug, fingerprint, lambda: _docstring_pairs(paths))


def _matches(parts: list[str], pattern: list[str]) -> bool:
  """Whether path components match glob components, as glob(recursive=True) does: ** matches any number
  of folders, and the other wildcards stay within one component."""
  if not pattern:
    return not parts
  if pattern[0] == "**":
    return any(_matches(parts[start:], pattern[1:]) for start in range(len(parts) + 1))
  return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _size_and_time(path: str) -> tuple[int, float]:
  """A file's size and modification time, which fingerprint it; (-1, -1) for a link to nothing."""
  try:
    status = os.stat(path)
  except OSError:
    return -1, -1.0
  return status.st_size, status.st_mtime


def text_files(pattern: str, text_key: str | None) -> Source:
  """Every .txt, .md, .py and .jsonl file under a directory (recursively) or matching a glob; with
  `text_key` None, every .jsonl file, its lines whole (records)."""
  extensions = TEXT_EXTENSIONS if text_key is not None else (".jsonl",)
  pattern = os.path.expanduser(pattern)
  if os.path.isdir(pattern):
    candidates = list(_walk(pattern))
  elif "**" in pattern:  # glob's ** would follow a link back into the tree forever
    root = pattern.split("**")[0].rstrip(os.sep) or "."
    rest = pattern[len(root) :].strip(os.sep).split(os.sep)
    candidates = [path for path in _walk(root) if _matches(os.path.relpath(path, root).split(os.sep), rest)]
  else:
    candidates = glob.glob(pattern)
  paths = sorted(p for p in candidates if (os.path.isfile(p) or os.path.islink(p)) and p.endswith(extensions))
  if not paths:
    raise FileNotFoundError(f"data.source: no {', '.join(extensions)} files at {pattern}")
  stats = [(p, *_size_and_time(p)) for p in paths]
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
      example = source[index]
      yield f"{spec}[{index}]", example[text_key] if text_key in example else Unusable("missing_text_key")

  fingerprint = _hash("tfds", builder.info.full_name, str(builder.data_dir), split, text_key)
  return Source("tfds-" + builder.info.full_name.replace("/", "_"), fingerprint, documents)


def from_config(data: ml_collections.ConfigDict, records: bool = False) -> Source:
  """The source named by data.source ("builtin", "text:<dir or glob>", "tfds:<name>[:<version>]").

  With `records`, for an objective that reads .jsonl records: each .jsonl line whole, and for
  "builtin" the standard library's docstring/signature pairs.
  """
  if data.source == "builtin":
    return builtin_chats() if records else builtin()
  if data.source.startswith("text:"):
    return text_files(data.source[len("text:") :], None if records else data.text_key)
  if data.source.startswith("tfds:"):
    return tfds_dataset(data.source[len("tfds:") :], data.tfds_data_dir, data.tfds_split, data.text_key)
  raise ValueError(f"data.source: unknown source {data.source!r}")
