"""Batches: documents stay apart, the batch at step k depends on (seed, k) alone, epochs reshuffle."""

import itertools
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import sharding
from lm.data import batch as batch_lib
from lm.data import pipeline, sources, tfds_builder

HERE = os.path.dirname(os.path.abspath(__file__))


def test_packed_rows_restart_segments_and_positions_at_every_eos():
  eos = 2
  tokens = np.array([[5, 6, 2, 7, 8, 9, 2, 2, 4]])
  rows = batch_lib.from_stream(tokens, eos)
  np.testing.assert_array_equal(rows["inputs"], [[5, 6, 2, 7, 8, 9, 2, 2]])
  np.testing.assert_array_equal(rows["targets"], [[6, 2, 7, 8, 9, 2, 2, 4]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 2, 2, 2, 2, 3, 4]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 0, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(rows["weights"], np.ones((1, 8)))


@pytest.fixture(scope="module")
def prepared(text_config):
  config = text_config()
  tokenizer, builder = tfds_builder.prepare(config.data)
  mesh = sharding.make_mesh(config.mesh)
  return config, tokenizer, builder, mesh, sharding.rules(config.mesh)


def _batches(prepared, start_step=0, count=4, config=None):
  default_config, tokenizer, builder, mesh, rules = prepared
  batches = pipeline.train_batches(config or default_config, mesh, rules, builder, tokenizer, start_step)
  return [jax.device_get(batch) for batch in itertools.islice(batches, count)]


def test_no_token_sees_another_document(prepared):
  config, tokenizer, builder, _, _ = prepared
  texts = tfds_builder.clean_documents(sources.from_config(config.data), config.data.max_document_chars)
  document_strings = [f" {' '.join(map(str, tokenizer.encode(text)))} " for text in texts]
  for batch in _batches(prepared, count=3):
    for inputs, segments, positions in zip(batch["inputs"], batch["segment_ids"], batch["positions"]):
      for segment in np.unique(segments):
        tokens = inputs[segments == segment]
        np.testing.assert_array_equal(positions[segments == segment], np.arange(len(tokens)))
        body = tokens[1:] if tokens[0] == tokenizer.eos_id else tokens  # a segment opens with EOS
        assert tokenizer.eos_id not in body
        # The segment is one contiguous run of a single document's tokens.
        needle = f" {' '.join(map(str, body))} "
        assert any(needle in document for document in document_strings)


def test_batches_are_identical_after_recreating_the_pipeline_at_step_k(prepared):
  from_start = _batches(prepared, count=6)
  from_four = _batches(prepared, start_step=4, count=2)
  for expected, got in zip(from_start[4:], from_four):
    for name in expected:
      np.testing.assert_array_equal(expected[name], got[name])
  assert not np.array_equal(from_start[0]["inputs"], from_start[1]["inputs"])


def test_epochs_cover_every_window_once_and_reshuffle(prepared):
  config, tokenizer, builder, mesh, rules = prepared
  num_windows = pipeline.num_windows(builder, "train", config.data.seq_len)
  batch_size = 4
  small = config.copy_and_resolve_references()
  small.data.batch_size = batch_size
  small.mesh.data = 4
  mesh = sharding.make_mesh(small.mesh, jax.devices()[:4])
  steps = -(-2 * num_windows // batch_size)  # enough rows for two whole epochs
  batches = pipeline.train_batches(small, mesh, rules, builder, tokenizer)
  rows = np.concatenate([jax.device_get(b)["inputs"] for b in itertools.islice(batches, steps)])
  first, second = rows[:num_windows], rows[num_windows : 2 * num_windows]
  key = lambda r: r.tobytes()  # noqa: E731
  assert sorted(map(key, first)) == sorted(map(key, second))  # each epoch is every window once
  assert len(set(map(key, first))) == num_windows
  assert [key(r) for r in first] != [key(r) for r in second]  # in a new order


def test_seed_changes_the_order(prepared):
  config = prepared[0].copy_and_resolve_references()
  config.data.seed = 1
  assert not np.array_equal(_batches(prepared, count=1)[0]["inputs"], _batches(prepared, count=1, config=config)[0]["inputs"])


def test_validation_batches_are_deterministic_and_in_order(prepared):
  config, tokenizer, builder, mesh, rules = prepared
  first = [jax.device_get(b) for b in pipeline.eval_batches(config, mesh, rules, builder, tokenizer)]
  second = [jax.device_get(b) for b in pipeline.eval_batches(config, mesh, rules, builder, tokenizer)]
  assert len(first) == pipeline.num_windows(builder, "validation", config.data.seq_len) // config.data.batch_size > 0
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  source = builder.as_data_source("validation")
  stream = np.concatenate([source[i]["tokens"] for i in range(len(source))])
  np.testing.assert_array_equal(first[0]["inputs"][1], stream[config.data.seq_len : 2 * config.data.seq_len])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize(
    "mesh_sizes",
    [
        {"data": -1},  # each process holds one block of rows
        {"data": -1, "dcn_fsdp": 2},  # the processes take turns: rows 0, 2, 4, ... and 1, 3, 5, ...
    ],
)
def test_two_processes_build_the_same_global_batches_as_one(prepared, mesh_sizes, tmp_path):
  expected = _batches(prepared, count=3)
  config = prepared[0].copy_and_resolve_references()
  config.mesh.update(mesh_sizes)
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  workers = [
      subprocess.Popen(
          [sys.executable, os.path.join(HERE, "two_process_batches.py"), str(port), str(process_id), str(tmp_path),
           config.to_json()],
          env=env,
      )
      for process_id in range(2)
  ]
  for worker in workers:
    assert worker.wait(timeout=600) == 0
  rows_of_process = [np.load(tmp_path / f"process{process_id}.npz")["rows"] for process_id in range(2)]
  np.testing.assert_array_equal(np.sort(np.concatenate(rows_of_process)), np.arange(config.data.batch_size))
  one_block = all(np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))) for rows in rows_of_process)
  assert one_block == ("dcn_fsdp" not in mesh_sizes)
  for process_id, rows in enumerate(rows_of_process):
    shards = np.load(tmp_path / f"process{process_id}.npz")
    for step in range(3):
      for name in ("inputs", "targets", "segment_ids", "positions", "weights"):
        np.testing.assert_array_equal(shards[f"{name}_{step}"], expected[step][name][rows])


def test_rows_with_more_documents_than_cudnn_keeps_apart_are_reported(monkeypatch):
  """Only when cuDNN will run: it joins a row's documents past model.cudnn_max_documents."""
  warnings = []
  monkeypatch.setattr(pipeline.logging, "log_first_n", lambda level, message, count: warnings.append(message))
  eos = 0
  windows = [np.array([eos, 5, eos, 6, eos, 7, 8, 9, 10]), np.array([1, 2, 3, 4, 5, 6, 7, 8, 9])]  # 3 and 1 documents
  to_rows = lambda tokens_BL, _: batch_lib.from_stream(tokens_BL, eos)  # causal LM's rows
  rows = pipeline._rows_of_step(windows, 2, np.arange(2), to_rows, 3, step=0)
  assert rows["segment_ids"][:, -1].tolist() == [3, 1] and warnings == []
  pipeline._rows_of_step(windows, 2, np.arange(2), to_rows, 2, step=0)
  assert len(warnings) == 1 and "holds 3 documents, more than model.cudnn_max_documents=2" in warnings[0]
  pipeline._rows_of_step(windows, 2, np.arange(2), to_rows, None, step=0)  # another kernel: no cap
  assert len(warnings) == 1
