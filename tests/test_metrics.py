"""FLOPs and MFU accounting, against hand counts of published shapes, and the throughput benchmark."""

import json
import os
import subprocess
import sys

import pytest

from lm import metrics
from lm.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(name: str):
  return load_config_file(os.path.join(REPO, "configs", f"{name}.py")).model


def test_gpt2_124m_flops_per_token_by_hand():
  # 12 layers x (q, k, v, o: 4 x 768^2; fc and proj: 2 x 768 x 3072) + LM head 768 x 50304
  matmul = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50304
  assert matmul == 123_568_128
  assert metrics.matmul_params(_model("gpt2_124m")) == matmul
  attention = 12 * 12 * 1024 * 768  # 12 L T d_attn; causal masking does half of it
  assert metrics.flops_per_token(_model("gpt2_124m"), 1024) == 6 * matmul + attention / 2 == 798_031_872
  assert metrics.flops_per_token(_model("gpt2_124m"), 1024, causal=False) == 6 * matmul + attention


def test_llama_1b_flops_per_token_by_hand():
  # 16 layers x (q, o: 2 x 2048 x 2048; k, v: 2 x 2048 x 512 (8 of 32 heads); gate, up, down: 3 x 2048 x 8192)
  # + LM head 2048 x 128256 (tied to the embedding, still a matmul)
  matmul = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 2048 * 128256
  assert metrics.matmul_params(_model("llama_1b")) == matmul == 1_235_746_816
  assert metrics.flops_per_token(_model("llama_1b"), 2048) == 6 * matmul + 6 * 16 * 2048 * 2048


@pytest.mark.parametrize(
    "kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                   ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("cpu", None)],
)  # fmt: skip
def test_peak_flops_by_device_kind(kind, peak):
  class Device:
    device_kind = kind

  assert metrics.peak_flops(Device()) == peak


def test_throughput_benchmark_reports_consistent_numbers(tmp_path):
  out = tmp_path / "result.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/throughput.py", "--config=configs/quickstart.py", "--config.model.num_layers=2",
       "--config.data.batch_size=8", "--config.data.seq_len=64", "--config.model.vocab_size=256",
       "--warmup=2", "--windows=3", "--steps=2", "--peak_flops=1e12", f"--json={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  numbers = json.loads(out.read_text())
  assert len(numbers["step_seconds_per_window"]) == 3
  tokens_per_second = numbers["tokens_per_step"] / numbers["step_seconds"] / numbers["num_devices"]
  assert numbers["tokens_per_second_per_device"] == pytest.approx(tokens_per_second)
  model = _model("quickstart")
  model.update(num_layers=2, vocab_size=256)
  assert numbers["matmul_parameters"] == metrics.matmul_params(model)
  assert numbers["mfu"] == pytest.approx(tokens_per_second * metrics.flops_per_token(model, 64) / 1e12)
  assert "tokens/s per device" in result.stdout
