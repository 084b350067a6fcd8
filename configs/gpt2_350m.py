"""GPT-2 medium (350M parameters)."""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the GPT-2 350M config: 124M's recipe with medium's shape."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "gpt2_124m.py"))

  config.model.num_layers = 24
  config.model.embed_dim = 1024
  config.model.num_heads = 16
  config.model.num_kv_heads = 16
  config.model.mlp_dim = 4096

  config.train.microbatches = 32  # 16 rows per microbatch on one device; not measured on a GPU yet
  config.optimizer.learning_rate = 3e-4
  return config
