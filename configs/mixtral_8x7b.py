"""Mixtral 8x7B's shape: 46.7B parameters, 12.9B active per token (2 of 8 experts), trained with FSDP over
every chip and the experts split over the expert axis.

    python -m lm.compile --config=configs/mixtral_8x7b.py --topology=v5p-128

which fits, measured (jax 0.10.2, libtpu 0.0.42.1, 2026-11-26; 64 chips as expert 8 x FSDP 8, full
remat, 4 microbatches of 4 x 4096 tokens per chip): 50.23 GiB per chip of 95.74, compiled in 152 s.

Capacity 1.25 (token choices past 1.25 x the balanced share of an expert per row are dropped, and
counted in `dropped_tokens`): dropless routing needs [rows, T, 8, T] dispatch tensors, too large at
T=4096. Import Mistral's weights with `python -m lm.interop import` to start from them.
"""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the Mixtral 8x7B config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))
  config.model.family = "llama"
  config.model.vocab_size = 32000
  config.data.tokenizer_vocab_size = 32000
  config.model.num_layers = 32
  config.model.embed_dim = 4096
  config.model.num_heads = 32
  config.model.num_kv_heads = 8
  config.model.mlp_dim = 14336
  config.model.num_experts = 8
  config.model.experts_per_token = 2
  config.model.expert_capacity_factor = 1.25
  config.model.max_seq_len = 32768
  config.model.rope_theta = 1e6
  config.model.tie_embeddings = False
  config.model.remat_policy = "full"

  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.expert = 8

  config.data.seq_len = 4096
  config.data.batch_size = 1024  # 4M tokens per step
  config.train.microbatches = 4
  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 2000
  config.train.steps = 100000
  return config
