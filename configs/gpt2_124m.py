"""GPT-2 small (124M parameters) with nanoGPT / llm.c's training recipe: 0.5M tokens per step."""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the GPT-2 124M config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))

  config.model.family = "gpt2"
  config.data.tokenizer_vocab_size = 50257  # GPT-2's vocabulary size ...
  config.model.vocab_size = 50304  # ... padded up to a multiple of 128 (used as is with synthetic data)
  config.model.num_layers = 12
  config.model.embed_dim = 768
  config.model.num_heads = 12
  config.model.num_kv_heads = 12
  config.model.mlp_dim = 3072
  config.model.max_seq_len = 1024
  config.model.tie_embeddings = True

  config.data.seq_len = 1024
  config.data.batch_size = 512  # 524,288 tokens per step
  # 64 rows per microbatch on one device: on one H100 (cuDNN attention, layers unrolled, chunked loss)
  # 64 rows took 27.8 GiB and ran 4% faster than 32 rows (14.9 GiB) (benchmarks/RESULTS.md).
  config.train.microbatches = 8

  config.optimizer.learning_rate = 6e-4
  config.optimizer.warmup_steps = 700
  config.optimizer.min_learning_rate_ratio = 0.1
  config.optimizer.weight_decay = 0.1
  config.train.steps = 19073  # 10B tokens
  return config
