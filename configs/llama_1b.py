"""Llama 3.2 1B's published shape: 16 layers, width 2048, 32 query and 8 key/value heads.

Where it fits, as `python -m lm.compile --config=configs/llama_1b.py --topology=...` measured it
(jax 0.10.2, libtpu 0.0.42.1, 2026-11-26; FSDP over every chip, splash attention, no remat,
64 microbatches of 4 x 2048 tokens):
- v5p-8: 15.90 GiB per chip of 95.74 (4 chips, 1 row each per microbatch).
On a v5e-4 the same needs 16.15 GiB of 15.75: add --config.model.remat_policy=full there.
"""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the Llama 1B config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))

  config.model.family = "llama"
  config.model.vocab_size = 128256
  config.data.tokenizer_vocab_size = 128256
  config.model.num_layers = 16
  config.model.embed_dim = 2048
  config.model.num_heads = 32
  config.model.num_kv_heads = 8
  config.model.mlp_dim = 8192
  config.model.max_seq_len = 8192
  config.model.rope_theta = 500000.0
  config.model.tie_embeddings = True

  config.mesh.data = 1
  config.mesh.fsdp = -1

  config.data.seq_len = 2048
  config.data.batch_size = 256  # 524,288 tokens per step
  # 4 rows of 2048 per microbatch on one device: on one H100 this shape took 28.5 GiB at 38.6% MFU (cuDNN
  # attention, layers unrolled, chunked loss: benchmarks/RESULTS.md). Over N devices, 64 / N keep it.
  config.train.microbatches = 64

  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 2000
  config.train.steps = 100000
  return config
