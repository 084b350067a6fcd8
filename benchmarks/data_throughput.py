"""Tokens per second per process that the input pipeline delivers, as global jax.Arrays.

    python benchmarks/data_throughput.py --config=configs/quickstart.py

Builds the config's data if missing, then times batches of 64 x 1024 and 32 x 2048 tokens.
"""

import itertools
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from lm import sharding
from lm.data import pipeline, tfds_builder

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Batches timed per shape, after 20 of warm-up.")
SHAPES = ((64, 1024), (32, 2048))  # (rows, seq_len): 65,536 tokens per batch


def main(argv):
  del argv
  config = ml_collections.ConfigDict(_CONFIG.value)
  tokenizer, builder = tfds_builder.prepare(config.data)
  config.mesh.data = -1
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  print(f"{'rows':>5} {'seq_len':>8} {'tokens/s per process':>22}  ({jax.process_count()} process, {jax.device_count()} devices)")
  for batch_size, seq_len in SHAPES:
    config.data.batch_size, config.data.seq_len = batch_size, seq_len
    batches = pipeline.train_batches(config, mesh, rules, builder, tokenizer)
    for batch in itertools.islice(batches, 20):
      jax.block_until_ready(batch)
    start = time.perf_counter()
    for batch in itertools.islice(batches, _BATCHES.value):
      jax.block_until_ready(batch)
    seconds = time.perf_counter() - start
    tokens_per_process = _BATCHES.value * batch_size * seq_len / jax.process_count()
    print(f"{batch_size:>5} {seq_len:>8} {tokens_per_process / seconds:>22,.0f}", flush=True)


if __name__ == "__main__":
  app.run(main)
