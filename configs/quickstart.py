"""A tiny Llama-style model that learns Python's standard library in minutes on a laptop CPU."""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the quickstart config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))

  config.model.num_layers = 4
  config.model.embed_dim = 128
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 384
  config.model.max_seq_len = 128
  config.model.dtype = "float32"  # CPUs have no fast bfloat16 matmuls

  config.data.source = "builtin"
  config.data.tokenizer_vocab_size = 4096
  config.data.validation_fraction = 0.05
  config.data.seq_len = 128
  config.data.batch_size = 32

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.0

  config.train.steps = 500
  config.train.log_every = 10
  config.checkpoint.every = 100
  config.eval.every = 100
  config.eval.steps = 0  # the whole validation split: 32 batches
  return config
