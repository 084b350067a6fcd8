"""A tiny BERT that learns masked LM on Python's standard library in a few minutes on a laptop CPU."""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the tiny BERT config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))

  config.model.family = "bert"
  config.model.num_layers = 4
  config.model.embed_dim = 128
  config.model.num_heads = 4
  config.model.num_kv_heads = 4
  config.model.mlp_dim = 512
  config.model.max_seq_len = 128
  config.model.norm_eps = 1e-12  # BERT's
  config.model.dtype = "float32"  # CPUs have no fast bfloat16 matmuls
  config.objective.name = "mlm"

  config.data.source = "builtin"
  config.data.tokenizer_vocab_size = 4096
  config.data.validation_fraction = 0.05
  config.data.seq_len = 128
  config.data.batch_size = 32

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.weight_decay = 0.01
  config.optimizer.b2 = 0.999

  config.train.steps = 500  # masked LM scores 15% of the tokens: it needs more steps than causal LM
  config.train.log_every = 10
  config.checkpoint.every = 100
  config.eval.every = 100
  config.eval.steps = 20
  return config
