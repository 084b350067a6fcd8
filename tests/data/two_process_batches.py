"""One of two processes for test_pipeline: builds batches 0..2 and saves the rows it holds.

    python two_process_batches.py PORT PROCESS_ID OUT_DIR CONFIG_JSON
"""

import json
import sys

import jax
import ml_collections
import numpy as np

port, process_id, out_dir, config_json = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))

from lm import sharding  # noqa: E402
from lm.data import pipeline, tfds_builder  # noqa: E402

config = ml_collections.ConfigDict(json.loads(config_json))
tokenizer, builder = tfds_builder.prepare(config.data)
mesh = sharding.make_mesh(config.mesh)
rules = sharding.rules(config.mesh)
batch_sharding = sharding.logical_sharding(mesh, rules, sharding.BATCH_AXES)
rows = sharding.process_rows(batch_sharding, (config.data.batch_size, config.data.seq_len))
arrays = {"rows": rows}
batches = pipeline.train_batches(config, mesh, rules, builder, tokenizer)
for step in range(3):
  batch = next(batches)
  for name, array in batch.items():
    assert array.shape == (config.data.batch_size, config.data.seq_len)
    by_first_row = {shard.index[0].indices(config.data.batch_size)[0]: np.asarray(shard.data) for shard in array.addressable_shards}
    arrays[f"{name}_{step}"] = np.concatenate([by_first_row[row] for row in sorted(by_first_row)])
np.savez(f"{out_dir}/process{process_id}.npz", **arrays)
