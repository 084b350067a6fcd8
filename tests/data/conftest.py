"""A small text corpus, and a tiny model config that reads it."""

import numpy as np
import pytest

WORDS = "the model reads every token of data once per epoch while loss falls and batches stay exact".split()


def make_document(rng: np.random.Generator, index: int) -> str:
  """A few lines of words and numbers, distinct for each index."""
  lines = [f"# document {index}"]
  for _ in range(int(rng.integers(3, 25))):
    words = rng.choice(WORDS, size=int(rng.integers(2, 12)))
    lines.append(" ".join(words) + f" = {int(rng.integers(0, 1000))}")
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  """60 plain-text documents in .txt, .md and .py files, in nested folders."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for index in range(60):
    folder = root / f"part{index % 3}"
    folder.mkdir(exist_ok=True)
    (folder / f"doc{index}{['.txt', '.md', '.py'][index % 3]}").write_text(make_document(rng, index))
  return root


@pytest.fixture(scope="session")
def text_config(tiny_config, corpus_dir, tmp_path_factory):
  """The tiny config on the corpus, with a 320-piece tokenizer built under a fresh data_dir."""
  data_dir = tmp_path_factory.mktemp("data")

  def make(overrides: dict | None = None):
    return tiny_config(
        "llama",
        {
            "data.source": f"text:{corpus_dir}",
            "data.data_dir": str(data_dir),
            "data.tokenizer_vocab_size": 320,
            "data.validation_fraction": 0.2,
            "data.seq_len": 32,
            **(overrides or {}),
        },
    )

  return make
