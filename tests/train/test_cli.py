"""`python -m lm.train` as a user runs it: files in the workdir and a falling loss."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_cli_trains_on_the_builtin_corpus_and_writes_the_workdir(tmp_path):
  """The README's first command, shortened: builds the built-in corpus from scratch, then trains."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "lm.train",
          "--config=configs/quickstart.py",
          f"--workdir={workdir}",
          "--config.train.steps=30",
          "--config.train.log_every=5",
          "--config.model.num_layers=2",
          f"--config.data.data_dir={tmp_path / 'data'}",
          "--config.data.tokenizer_vocab_size=1024",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert result.returncode == 0, result.stderr
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [5, 10, 15, 20, 25, 30]
  for row in rows:
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second"} <= row.keys()
  assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
  assert json.loads((workdir / "config.json").read_text())["model"]["num_layers"] == 2
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  progress_lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
  assert len(progress_lines) == 6 and "tok/s" in progress_lines[-1] and "ETA" in progress_lines[-1]
