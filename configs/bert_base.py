"""BERT-base (110M parameters) pretrained by masked LM with BERT's recipe: 256 rows of 512 tokens, AdamW at
1e-4 with 10k warmup steps and linear decay, weight decay 0.01, dropout 0.1 (one phase at length 512, no
next-sentence prediction, as RoBERTa found it unneeded)."""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the BERT-base config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))

  config.model.family = "bert"
  config.data.tokenizer_vocab_size = 30522  # BERT's vocabulary size
  config.model.num_layers = 12
  config.model.embed_dim = 768
  config.model.num_heads = 12
  config.model.num_kv_heads = 12
  config.model.mlp_dim = 3072
  config.model.max_seq_len = 512
  config.model.type_vocab_size = 2
  config.model.norm_eps = 1e-12
  config.model.dropout_rate = 0.1
  config.objective.name = "mlm"

  config.data.seq_len = 512
  config.data.batch_size = 256  # 131,072 tokens per step

  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = "linear"
  config.optimizer.min_learning_rate_ratio = 0.0
  config.optimizer.warmup_steps = 10_000
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-6
  config.optimizer.weight_decay = 0.01
  config.train.steps = 1_000_000
  config.checkpoint.every = 10_000
  config.eval.every = 10_000
  return config
