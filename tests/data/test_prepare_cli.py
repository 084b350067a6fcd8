"""`python -m lm.prepare`, then `python -m lm.train` on a folder of text, as a user runs them."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(module, *args):
  return subprocess.run(
      [sys.executable, "-m", module, "--config=configs/quickstart.py", *args],
      cwd=REPO, capture_output=True, text=True, timeout=900,
  )


def test_prepare_then_train_on_a_text_folder(corpus_dir, tmp_path):
  data_flags = [
      f"--config.data.source=text:{corpus_dir}",
      f"--config.data.data_dir={tmp_path / 'data'}",
      "--config.data.tokenizer_vocab_size=300",
      "--config.data.validation_fraction=0.2",
      "--config.data.seq_len=32",
  ]
  prepared = _run("lm.prepare", *data_flags)
  assert prepared.returncode == 0, prepared.stderr
  assert "Kept train" in prepared.stdout and "Shards:" in prepared.stdout

  workdir = tmp_path / "run"
  model_flags = ["--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.data.batch_size=8"]
  trained = _run("lm.train", f"--workdir={workdir}", "--config.train.steps=40", *data_flags, *model_flags)
  assert trained.returncode == 0, trained.stderr
  assert "Tokenizing" not in trained.stdout  # prepare already built it
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["vocab_size"] == 384  # <= 300 pieces, padded to a multiple of 128


def test_a_missing_text_folder_is_one_line(tmp_path):
  result = _run("lm.prepare", f"--config.data.source=text:{tmp_path}/missing", f"--config.data.data_dir={tmp_path}")
  assert result.returncode != 0
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert "no .txt, .md, .py, .jsonl files" in result.stderr
