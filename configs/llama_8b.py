"""Llama 3 8B's published shape: 32 layers, width 4096, 32 query and 8 key/value heads.

Where it fits, as `python -m lm.compile --config=configs/llama_8b.py --topology=...` measured it
(jax 0.10.2, libtpu 0.0.42.1, 2026-11-26; FSDP over every chip, splash attention, full remat,
2 microbatches of 256 x 8192 tokens):
- v5p-64: 47.76 GiB per chip of 95.74 (32 chips, 8 rows each per microbatch).
- v5e-256: 9.07 GiB per chip of 15.75 (256 chips, 1 row each per microbatch).

On GPUs it needs several: its 8.0B parameters take 120 GiB with their gradients and AdamW's two
moments in float32, more than one 80 GB GPU holds, so shard them (FSDP) over at least 4 GPUs
(30 GiB each before activations) and measure with benchmarks/step_memory.py there.
"""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the Llama 8B config, FSDP over every device with full rematerialization."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))

  config.model.family = "llama"
  config.model.vocab_size = 128256
  config.data.tokenizer_vocab_size = 128256
  config.model.num_layers = 32
  config.model.embed_dim = 4096
  config.model.num_heads = 32
  config.model.num_kv_heads = 8
  config.model.mlp_dim = 14336
  config.model.max_seq_len = 8192
  config.model.rope_theta = 500000.0
  config.model.tie_embeddings = False
  config.model.remat_policy = "full"

  config.mesh.data = 1
  config.mesh.fsdp = -1

  config.data.seq_len = 8192
  config.data.batch_size = 512  # 4M tokens per step
  config.train.microbatches = 2  # 8 rows per chip per microbatch on a v5p-64

  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 2000
  config.train.steps = 100000
  return config
