"""Masked LM (BERT) and span corruption (T5): the rows they make, and training with them end to end."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import lm
from lm.config import ConfigError
from lm.objectives import mlm, span_corruption
from lm.train import loop

from conftest import REPO


def test_masking_chooses_the_rate_of_tokens_and_treats_them_80_10_10():
  rng = np.random.default_rng(0)
  eos, mask, vocab = 2, 3, 1000
  tokens_T = rng.integers(10, vocab, 4000)
  tokens_T[::50] = eos
  inputs_T, weights_T = mlm.mask_tokens(tokens_T, rng, 0.15, mask, vocab, keep=eos)
  chosen = weights_T == 1
  assert chosen.sum() == round(0.15 * (tokens_T != eos).sum())
  assert not chosen[tokens_T == eos].any()  # document starts are never chosen
  np.testing.assert_array_equal(inputs_T[~chosen], tokens_T[~chosen])
  masked = (inputs_T == mask) & chosen
  kept = (inputs_T == tokens_T) & chosen
  replaced = chosen & ~masked & ~kept
  assert abs(masked.sum() / chosen.sum() - 0.8) < 0.05
  assert abs(kept.sum() / chosen.sum() - 0.1) < 0.04  # (a random token equal to the original counts as kept)
  assert abs(replaced.sum() / chosen.sum() - 0.1) < 0.04


def test_span_corruption_lengths_are_t5s():
  # T5's random_spans_helper: 512 input tokens come from windows of 568, whose targets take 114.
  assert span_corruption.lengths(512, 0.15, 3.0) == (568, 114)
  assert span_corruption.lengths(128, 0.15, 3.0) == (141, 29)  # configs/t5_tiny.py


@pytest.mark.parametrize("length", [9, 40, 141, 568])
def test_span_corruption_drops_spans_that_the_targets_restore(length):
  rng = np.random.default_rng(length)
  tokens_R = rng.integers(200, 300, length)
  sentinels, eos = list(range(100, 200)), 2
  num_noise, num_spans = span_corruption.noise_counts(length, 0.15, 3.0)
  is_noise_R = span_corruption.noise_mask(length, 0.15, 3.0, rng)
  assert is_noise_R.sum() == num_noise and not is_noise_R[0]
  assert np.sum(np.diff(is_noise_R.astype(int)) == 1) == num_spans
  inputs, targets = span_corruption.corrupt(tokens_R, is_noise_R, sentinels, eos)
  window, decoder_length = span_corruption.lengths(length, 0.15, 3.0)
  assert len(targets) == num_noise + num_spans + 1 and inputs[-1] == targets[-1] == eos
  # Put each span back where its sentinel stands: the window again.
  spans, current = {}, None
  for token in targets[:-1]:
    if token in sentinels:
      current = token
      spans[current] = []
    else:
      spans[current].append(token)
  restored = [piece for token in inputs[:-1] for piece in (spans[token] if token in sentinels else [token])]
  assert restored == tokens_R.tolist()


def _config(text_config, family, objective, overrides=None):
  return text_config({
      "model.family": family, "objective.name": objective, "model.num_kv_heads": 4, "model.head_dim": 8,
      "data.tokenizer_vocab_size": 480, "optimizer.learning_rate": 3e-3, "train.log_every": 1,
      "eval.every": 0, "checkpoint.every": 0, **(overrides or {}),
  })  # fmt: skip


OBJECTIVES = [("bert", "mlm"), ("t5", "span_corruption")]


@pytest.mark.parametrize("family, objective", OBJECTIVES)
def test_sharded_equals_one_device_and_the_rows_of_step_k_depend_on_seed_and_k_only(text_config, family, objective):
  config = _config(text_config, family, objective, {"train.steps": 6, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})

  def setup(devices, **mesh):
    run_config = config.copy_and_resolve_references()
    run_config.mesh.update(mesh)
    return loop.setup(run_config, devices)

  def losses(run, start_step=0, state=None):
    state = run.init_state() if state is None else state
    batches = run.train_batches(start_step)
    result, at_3 = [], None
    for step in range(start_step, 6):
      state, metrics = run.train_step(state, next(batches), jax.random.fold_in(jax.random.key(0), step))
      result.append(float(metrics["loss"]))
      if step == 2:
        at_3 = jax.tree.map(lambda leaf: leaf.copy(), state)  # the next step donates `state`
    return result, at_3

  eight_devices = setup(jax.devices())
  eight, state_at_3 = losses(eight_devices)
  one, _ = losses(setup(jax.devices()[:1], data=1, fsdp=1, tensor=1))
  np.testing.assert_allclose(one, eight, rtol=1e-5)
  assert eight[-1] < eight[0]  # it learns
  resumed, _ = losses(eight_devices, start_step=3, state=state_at_3)  # batches from step 3 on: (seed, step) only
  assert resumed == eight[3:]


def _train_command(workdir, corpus_dir, data_dir, family, objective, steps):
  return [
      sys.executable, "-m", "lm.train", f"--config=configs/{family}_tiny.py", f"--workdir={workdir}",
      f"--config.data.source=text:{corpus_dir}", f"--config.data.data_dir={data_dir}",
      "--config.data.tokenizer_vocab_size=480", "--config.data.seq_len=32", "--config.data.batch_size=8",
      "--config.model.num_layers=2", "--config.model.embed_dim=32", "--config.model.mlp_dim=64",
      "--config.model.num_decoder_layers=2", "--config.model.head_dim=8", f"--config.train.steps={steps}",
      "--config.train.log_every=1", "--config.checkpoint.every=3", "--config.eval.every=0",
      "--config.data.validation_fraction=0.2", "--config.optimizer.warmup_steps=2",
  ]  # fmt: skip


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  for line in open(path) if os.path.exists(path) else []:
    try:
      rows.append(json.loads(line))
    except ValueError:  # being written
      pass
  return rows


@pytest.mark.parametrize("family, objective", OBJECTIVES)
def test_kill_9_and_rerun_equals_the_uninterrupted_run(corpus_dir, tmp_path, family, objective):
  steps, data_dir = 12, tmp_path / "data"
  reference = tmp_path / "reference"
  command = _train_command(reference, corpus_dir, data_dir, family, objective, steps)
  subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=900)
  expected = _rows(reference)

  workdir = tmp_path / "killed"
  process = subprocess.Popen(_train_command(workdir, corpus_dir, data_dir, family, objective, steps), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
  deadline = time.time() + 600
  while process.poll() is None and time.time() < deadline and max([row["step"] for row in _rows(workdir)], default=0) < 5:
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(row["step"] for row in _rows(workdir))
  assert killed_at < steps
  finished = subprocess.run(_train_command(workdir, corpus_dir, data_dir, family, objective, steps), cwd=REPO,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
  assert finished.returncode == 0, finished.stderr
  got = _rows(workdir)
  assert [row["step"] for row in got] == list(range(1, steps + 1))
  assert [row["loss"] for row in got] == [row["loss"] for row in expected]  # bit for bit
  assert [row["grad_norm"] for row in got] == [row["grad_norm"] for row in expected]

  loaded = lm.load(str(workdir))
  result = loaded.evaluate(max_batches=2)
  assert set(result) == {"loss", "accuracy", "perplexity", "tokens"} and 0 <= result["accuracy"] <= 1
  assert result == loaded.evaluate(max_batches=2)  # evaluation masks (or drops spans) the same way every time
  if objective == "span_corruption":  # the encoder reads the prompt; the decoder's tokens come back as text
    from lm import generate

    prompt = "the <extra_id_0> reads every"
    (text,) = loaded.generate([prompt], max_new_tokens=6, temperature=0.0)
    (ids,) = generate.generate_encoder_decoder_ids(
        loaded.model, loaded.params, loaded.mesh, loaded.axis_rules, [loaded.tokenizer.encode(prompt) + [loaded.tokenizer.eos_id]],
        max_new_tokens=6, eos_id=loaded.tokenizer.eos_id, start_id=span_corruption.decoder_start_id(loaded.tokenizer), temperature=0.0,
        vocab_size=loaded.tokenizer.vocab_size,
    )  # fmt: skip
    assert 1 <= len(ids) <= 6 and text == loaded.tokenizer.decode(ids)
  else:
    with pytest.raises(lm.config.UserError, match="trained for mlm, not to write text"):
      loaded.generate(["the"])


def test_a_tokenizer_without_the_objectives_pieces_is_one_line(text_config, tmp_path):
  trained = loop.setup(text_config())  # the causal-LM tokenizer: no mask piece, no sentinels
  for family, objective in OBJECTIVES:
    config = _config(text_config, family, objective, {"data.tokenizer": trained.tokenizer.path})
    with pytest.raises(ConfigError, match="data.tokenizer: .* (no mask token|lacks <extra_id_0>)"):
      loop.setup(config)


@pytest.mark.parametrize("family, objective", [("llama", "mlm"), ("bert", "span_corruption"), ("t5", "classification")])
def test_an_objective_names_the_families_it_trains(text_config, family, objective):
  with pytest.raises(ConfigError, match=f"model.family: objective {objective} trains"):
    loop.setup(_config(text_config, family, objective))


def test_prepare_ahead_of_time_builds_the_tokenizer_that_training_uses(text_config, capsys):
  from lm import prepare
  from lm.data import tokenizer as tokenizer_lib

  config = _config(text_config, "bert", "mlm")
  prepare.prepare(config.copy_and_resolve_references())
  printed = capsys.readouterr().out
  path = printed.split("Tokenizer: ")[1].split(" (")[0]
  assert tokenizer_lib.load(path).token_id(mlm.MASK_PIECE) is not None
  assert loop.setup(config).tokenizer.path == path
