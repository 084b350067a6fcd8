"""The PyTorch peer runs and reports with lm's FLOP accounting."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

pytest.importorskip("torch")

from lm import metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torch_gpt2_peer_reports_throughput_and_mfu(tmp_path):
  out = tmp_path / "peer.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/peers/torch_gpt2.py", "--n_layer=2", "--n_head=4", "--n_embd=64", "--seq_len=64",
       "--batch_size=8", "--vocab_size=256", "--no-compile", "--warmup=1", "--windows=2", "--steps=2",
       "--peak_flops=1e12", f"--json={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  numbers = json.loads(out.read_text())
  # GPT-2 shape: tied embedding (256 x 64) + positions (64 x 64) + 2 blocks + final LayerNorm
  block = 2 * 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
  assert numbers["parameters"] == 256 * 64 + 64 * 64 + 2 * block + 2 * 64
  shape = ml_collections.ConfigDict(dict(family="gpt2", num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4,
                                         mlp_dim=256, vocab_size=256))  # fmt: skip
  tokens_per_second = 8 * 64 / numbers["step_seconds"]
  assert numbers["tokens_per_second_per_device"] == pytest.approx(tokens_per_second)
  assert numbers["mfu"] == pytest.approx(tokens_per_second * metrics.flops_per_token(shape, 64) / 1e12)
