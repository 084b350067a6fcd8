"""A tiny T5 (v1.1) that learns span corruption on Python's standard library in a few minutes on a laptop CPU."""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the tiny T5 config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))

  config.model.family = "t5"
  config.model.num_layers = 3  # encoder blocks
  config.model.num_decoder_layers = 3
  config.model.embed_dim = 128
  config.model.num_heads = 4
  config.model.num_kv_heads = 4
  config.model.head_dim = 32
  config.model.mlp_dim = 384
  config.model.max_seq_len = 128
  config.model.tie_embeddings = False  # T5 v1.1's untied output layer
  config.model.norm_eps = 1e-6  # T5's
  config.model.dtype = "float32"  # CPUs have no fast bfloat16 matmuls
  config.objective.name = "span_corruption"

  config.data.source = "builtin"
  config.data.tokenizer_vocab_size = 4096
  config.data.validation_fraction = 0.05
  config.data.seq_len = 128  # encoder tokens; the decoder writes 29 (21 tokens of a 141-token window in 7 spans, + EOS)
  config.data.batch_size = 32

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.weight_decay = 0.0

  config.train.steps = 300
  config.train.log_every = 10
  config.checkpoint.every = 100
  config.eval.every = 100
  config.eval.steps = 10
  return config
