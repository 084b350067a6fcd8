"""Evaluation: loss, perplexity and bits per byte, in training, from lm.load, and from the command line."""

import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import lm
from lm import inference, objectives, sharding
from lm.models import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summarize():
  result = objectives.CausalLM(None).summarize({"loss_sum": 60.0, "tokens": 30.0, "bytes": 100.0})
  assert result == {"loss": 2.0, "perplexity": math.exp(2.0), "bits_per_byte": 60.0 / (math.log(2) * 100.0), "tokens": 30}


def test_training_logs_eval_metrics_at_eval_steps(trained_run):
  _, workdir = trained_run
  rows = {row["step"]: row for row in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
  for step in (3, 6):
    assert rows[step]["eval_perplexity"] == pytest.approx(math.exp(rows[step]["eval_loss"]))
    assert 0 < rows[step]["eval_bits_per_byte"] < rows[step]["eval_loss"] / math.log(2)  # tokens hold > 1 byte
  assert "eval_loss" not in rows[2]


def test_loaded_checkpoint_evaluates_the_whole_validation_split(trained_run):
  config, workdir = trained_run
  loaded = lm.load(workdir)
  assert loaded.step == 6 and loaded.steps() == [3, 6]
  result = loaded.evaluate()
  assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
  # The in-training number used only eval.steps=2 batches; the same 2 batches give the same loss.
  rows = {row["step"]: row for row in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
  assert loaded.evaluate(max_batches=2)["loss"] == pytest.approx(rows[6]["eval_loss"], rel=1e-5)
  assert loaded.at_step(3).evaluate(max_batches=2)["loss"] == pytest.approx(rows[3]["eval_loss"], rel=1e-5)


def test_bits_per_byte_of_a_text_matches_a_hand_computation(trained_run):
  _, workdir = trained_run
  loaded = lm.load(workdir)
  text = "the model reads every token = 42\ncafé ✓"
  result = loaded.loss([text])

  tokens = [loaded.tokenizer.eos_id] + loaded.tokenizer.encode(text)
  inputs = np.array([tokens[:-1]])
  logits = loaded.model.apply({"params": jax.device_get(loaded.params)}, inputs, np.ones_like(inputs), np.arange(inputs.shape[1])[None])
  log_probs = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
  nats = -sum(float(log_probs[t, target]) for t, target in enumerate(tokens[1:]))
  assert result["tokens"] == len(tokens) - 1
  assert result["loss"] == pytest.approx(nats / (len(tokens) - 1), rel=1e-5)
  assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)


def test_a_run_trained_on_8_devices_loads_in_a_1_device_process(trained_run):
  _, workdir = trained_run
  expected = lm.load(workdir).evaluate(max_batches=2)
  code = f"import json, lm; print(json.dumps(lm.load({workdir!r}).evaluate(max_batches=2)))"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
  assert result.returncode == 0, result.stderr
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got["tokens"] == expected["tokens"]
  assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_evaluate_and_generate_commands(trained_run):
  _, workdir = trained_run
  evaluated = subprocess.run(
      [sys.executable, "-m", "lm.evaluate", f"--workdir={workdir}", "--all", "--max_batches=2"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert evaluated.returncode == 0, evaluated.stderr
  lines = [json.loads(line) for line in evaluated.stdout.strip().splitlines()]
  assert [line["step"] for line in lines] == [3, 6]
  assert set(lines[0]) == {"step", "loss", "perplexity", "bits_per_byte", "tokens"}

  generated = subprocess.run(
      [sys.executable, "-m", "lm.generate", f"--workdir={workdir}", "--prompt=the model", "--max_new_tokens=5",
       "--temperature=0"], cwd=REPO, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert generated.returncode == 0, generated.stderr
  assert generated.stdout.startswith("the model")
  greedy = lm.load(workdir).generate(["the model"], max_new_tokens=5, temperature=0.0)[0]
  assert generated.stdout.rstrip("\n") == "the model" + greedy


def test_missing_workdir_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "lm.evaluate", f"--workdir={tmp_path}/none"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [f"error: no checkpoints at {tmp_path}/none"]


@pytest.mark.parametrize("embed_dim, devices", [(32, 8), (36, 4), (33, 1)])
def test_the_inference_mesh_uses_the_devices_the_model_width_splits_over(tiny_config, embed_dim, devices):
  config = tiny_config("gpt2", {"model.embed_dim": embed_dim, "model.num_heads": 1, "model.num_kv_heads": 1})
  mesh = inference.inference_mesh(config)
  assert dict(mesh.shape) == {"stage": 1, "data": 1, "fsdp": devices, "expert": 1, "tensor": 1, "sequence": 1}
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  sharding.abstract_params(model, mesh, sharding.rules(config.mesh))  # every parameter splits evenly


def test_evaluating_a_run_reads_the_data_it_trained_on_without_preparing_it_again(trained_run, monkeypatch):
  import shutil

  from lm.data import tfds_builder

  _, workdir = trained_run
  expected = lm.load(workdir).evaluate(max_batches=2)
  assert json.load(open(os.path.join(workdir, "dataset.json")))["data_dir"].endswith("1.1.0")

  def no_preparing(*args, **kwargs):
    raise AssertionError("the data was prepared again")

  monkeypatch.setattr(tfds_builder, "prepare", no_preparing)
  assert lm.load(workdir).evaluate(max_batches=2) == expected
  moved = os.path.join(os.path.dirname(workdir), "moved-dataset.json")
  shutil.move(os.path.join(workdir, "dataset.json"), moved)  # a run from before datasets were recorded
  try:
    with pytest.raises(AssertionError, match="prepared again"):
      lm.load(workdir).evaluate(max_batches=2)
  finally:
    shutil.move(moved, os.path.join(workdir, "dataset.json"))
