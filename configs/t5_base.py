"""T5 v1.1 base (248M parameters) pretrained by span corruption: 512 encoder tokens (114 decoder tokens) per
row, 128 rows per step. T5 trained with Adafactor at 1e-2; lm's optax loop runs AdamW, at a learning rate
usual for AdamW at this size."""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the T5 v1.1 base config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))

  config.model.family = "t5"
  config.data.tokenizer_vocab_size = 32000  # T5's sentencepiece vocabulary (32,100 with its 100 sentinels)
  config.model.num_layers = 12  # encoder blocks
  config.model.num_decoder_layers = 12
  config.model.embed_dim = 768
  config.model.num_heads = 12
  config.model.num_kv_heads = 12
  config.model.head_dim = 64
  config.model.mlp_dim = 2048
  config.model.max_seq_len = 512
  config.model.relative_buckets = 32
  config.model.relative_max_distance = 128
  config.model.tie_embeddings = False
  config.model.norm_eps = 1e-6
  config.model.dropout_rate = 0.0  # T5 v1.1 pretrains without dropout
  config.objective.name = "span_corruption"

  config.data.seq_len = 512
  config.data.batch_size = 128

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10_000
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 0.01
  config.train.steps = 500_000
  config.checkpoint.every = 10_000
  config.eval.every = 10_000
  return config
