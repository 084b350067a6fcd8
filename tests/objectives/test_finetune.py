"""Fine-tuning end to end: SFT and classification from a pretrained run, as a user runs them."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import lm
from lm.train import checkpoint, loop

from conftest import REPO, WORDS  # tests/conftest.py

CLASSES = ("model", "token", "epoch")


def _write_jsonl(path, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def chats_dir(tmp_path_factory):
  """Prompt/response pairs (the response is the prompt's words reversed) and chats, plus lines that are not examples."""
  root = tmp_path_factory.mktemp("chats")
  rng = np.random.default_rng(1)
  records = []
  for index in range(240):
    words = [str(word) for word in rng.choice(WORDS, size=int(rng.integers(2, 6)))]
    prompt, response = " ".join(words), " ".join(reversed(words))
    if index % 3:
      records.append({"prompt": prompt, "response": response})
    else:
      records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
  records += [{"prompt": "no response"}, ["not", "an", "object"]]
  _write_jsonl(str(root / "part" / "chats.jsonl"), records)
  (root / "notes.txt").write_text("ignored: objectives that read records read .jsonl files only")
  return root


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory):
  """Texts of random words, each labelled by its last word (one of CLASSES), by name."""
  root = tmp_path_factory.mktemp("labelled")
  rng = np.random.default_rng(2)
  records = []
  for _ in range(400):
    label = str(rng.choice(CLASSES))
    words = [str(word) for word in rng.choice(WORDS, size=int(rng.integers(2, 8)))]
    records.append({"text": " ".join(words + [label]), "label": label})
  records.append({"text": "a label that is not a class", "label": "other"})
  _write_jsonl(str(root / "train.jsonl"), records)
  return root


def _finetune_config(text_config, workdir, overrides):
  return text_config({
      "checkpoint.init_from": workdir, "checkpoint.init_model": True, "model.num_layers": 1,  # replaced by the run's 2
      "data.validation_fraction": 0.2, "data.seq_len": 64, "optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 2,
      "train.log_every": 1, "eval.steps": 0, "checkpoint.every": 0, **overrides,
  })  # fmt: skip


def test_sft_from_a_pretrained_run_lowers_the_response_loss(text_config, trained_run, chats_dir, tmp_path, capsys):
  _, pretrained = trained_run
  config = _finetune_config(text_config, pretrained, {
      "objective.name": "sft", "data.source": f"text:{chats_dir}", "data.batch_size": 8, "train.steps": 24, "eval.every": 12,
  })  # fmt: skip
  run = loop.setup(config.copy_and_resolve_references())
  assert run.config.model.num_layers == 2 and run.config.data.tokenizer == os.path.join(pretrained, "tokenizer.model")
  before = run.evaluate(checkpoint.init_from(run.config.checkpoint, run.init_state(), run.abstract_state).params)

  workdir = str(tmp_path / "sft")
  loop.train(config, workdir)
  out = capsys.readouterr().out
  kept = [line for line in out.splitlines() if line.startswith("Kept")]
  assert "skipped 2 not_an_example" in kept[-1] and "examples longer than data.seq_len cut" in kept[-1], kept
  assert "Initialized params from" in out
  rows = {row["step"]: row for row in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
  assert rows[0]["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)  # evaluated before fine-tuning
  assert rows[24]["eval_loss"] < rows[12]["eval_loss"] < before["eval_loss"]

  loaded = lm.load(workdir)
  (reply,) = loaded.generate(["model token epoch"], max_new_tokens=12, temperature=0.0)
  assert isinstance(reply, str) and "### Assistant" not in reply
  result = loaded.evaluate()
  assert result["loss"] == pytest.approx(rows[24]["eval_loss"], rel=1e-5)
  dataset = run.dataset.info.metadata
  responses = result["tokens"]  # response tokens and the EOS ending each, of the validation examples only
  assert 0 < responses < sum(dataset["validation_lengths"])


def test_sft_runs_equal_on_one_device_and_eight_and_resume_exactly(text_config, trained_run, chats_dir, tmp_path):
  _, pretrained = trained_run
  config = _finetune_config(text_config, pretrained, {
      "objective.name": "sft", "data.source": f"text:{chats_dir}", "data.batch_size": 8, "train.steps": 4, "eval.every": 0,
  })  # fmt: skip

  def losses(devices, start_step=0, steps=4, state=None):
    run = loop.setup(config.copy_and_resolve_references(), devices)
    if state is None:
      state = checkpoint.init_from(run.config.checkpoint, run.init_state(), run.abstract_state)
    batches = run.train_batches(start_step)
    result = []
    for step in range(start_step, steps):
      state, metrics = run.train_step(state, next(batches), jax.random.fold_in(jax.random.key(0), step))
      result.append(float(metrics["loss"]))
    return result, state

  eight, state = losses(jax.devices())
  np.testing.assert_allclose(losses(jax.devices()[:1])[0], eight, rtol=1e-5)
  assert len(set(eight)) == 4
  first_two, state_at_2 = losses(jax.devices(), steps=2)
  resumed, _ = losses(jax.devices(), start_step=2, state=state_at_2)  # batches from step 2 on: (seed, step) only
  assert first_two + resumed == eight


def test_classification_fine_tune_reaches_well_above_chance(text_config, trained_run, labelled_dir, tmp_path, capsys):
  _, pretrained = trained_run
  config_overrides = {
      "objective.name": "classification", "objective.class_names": ",".join(CLASSES), "data.source": f"text:{labelled_dir}",
      "data.batch_size": 8, "train.steps": 40, "eval.every": 40, "checkpoint.every": 20,
  }  # fmt: skip
  config = _finetune_config(text_config, pretrained, config_overrides)
  workdir = str(tmp_path / "classify")
  loop.train(config, workdir)
  out = capsys.readouterr().out
  assert "skipped 1 bad_label" in out and "classifier newly initialized" in out
  rows = {row["step"]: row for row in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
  assert rows[40]["eval_accuracy"] > 0.8  # chance: 1/3

  result = subprocess.run(
      [sys.executable, "-m", "lm.evaluate", f"--workdir={workdir}", "--all"], cwd=REPO, capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stderr
  printed = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [row["step"] for row in printed] == [20, 40]
  last = printed[-1]
  assert last["accuracy"] == pytest.approx(rows[40]["eval_accuracy"], abs=1e-6)
  assert set(last) >= {"loss", "accuracy", "macro_f1", "f1_model", "f1_token", "f1_epoch", "examples"}
  assert last["examples"] == lm.load(workdir).evaluate()["examples"] > 40
  assert printed[0]["accuracy"] <= last["accuracy"]

  # Resumed, the run takes its model and tokenizer from its own checkpoints, not from init_from's run.
  elsewhere = tmp_path / "no_run_here"
  elsewhere.mkdir()
  resumed = loop.setup(_finetune_config(text_config, str(elsewhere), config_overrides), workdir=workdir)
  assert resumed.config.model.num_layers == 2 and resumed.config.data.tokenizer == os.path.join(workdir, "tokenizer.model")


def test_bert_classification_fine_tune_reads_the_first_token_and_reports_accuracy_and_f1(text_config, labelled_dir, tmp_path):
  bert = {"model.family": "bert", "model.num_kv_heads": 4, "data.tokenizer_vocab_size": 480}
  pretrained = str(tmp_path / "bert")
  loop.train(text_config({**bert, "objective.name": "mlm", "train.steps": 4, "eval.every": 0}), pretrained)
  config = _finetune_config(text_config, pretrained, {
      **bert, "objective.name": "classification", "objective.class_names": ",".join(CLASSES),
      "data.source": f"text:{labelled_dir}", "data.batch_size": 8, "train.steps": 40, "eval.every": 20,
  })  # fmt: skip
  run = loop.setup(config.copy_and_resolve_references())
  assert run.objective.at_first_token and run.config.model.family == "bert"
  example = run.objective.example({"text": "the model token", "label": "epoch"}, run.tokenizer, 64)
  assert example.weights.tolist() == [1.0] + [0.0] * (len(example.weights) - 1) and example.targets[0] == 2

  workdir = str(tmp_path / "classify")
  loop.train(config, workdir)
  rows = {row["step"]: row for row in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
  assert {"eval_accuracy", "eval_macro_f1", "eval_f1_model"} <= set(rows[40])
  assert rows[40]["eval_loss"] < rows[0]["eval_loss"]
  assert rows[40]["eval_accuracy"] > 0.6  # chance: 1/3


def test_records_that_give_no_example_for_training_say_so_in_one_line(text_config, trained_run, tmp_path):
  from lm.config import ConfigError

  _, pretrained = trained_run
  labels = ["pos", "neg", "pos", "neg", "pos"]  # names, but the config names no classes
  _write_jsonl(str(tmp_path / "named" / "labels.jsonl"), [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)])
  config = text_config({
      "objective.name": "classification", "objective.num_classes": 2, "data.source": f"text:{tmp_path / 'named'}",
      "data.tokenizer": os.path.join(pretrained, "tokenizer.model"), "data.data_dir": str(tmp_path / "data"),
  })  # fmt: skip
  with pytest.raises(ConfigError, match=r"^data.source: text-named has no classification examples for training; skipped "
                     r"5 bad_label \(the records it reads: lm/objectives/classification.py\)$"):
    loop.setup(config)


def test_a_classification_run_is_not_exported_as_a_language_model(tmp_path, monkeypatch):
  from lm import inference, objectives
  from lm.config import UserError
  from lm.interop import __main__ as interop

  class Loaded:
    objective = objectives.get(ml_collections.ConfigDict({"objective": {"name": "classification", "num_classes": 2, "class_names": ""}}))

  monkeypatch.setattr(inference, "load", lambda workdir, step: Loaded())
  with pytest.raises(UserError, match="is a classification run: export writes causal language models"):
    interop.export(str(tmp_path / "run"), None, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
