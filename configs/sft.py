"""Supervised fine-tuning of a run (pretrained, or imported from Hugging Face) on prompt/response pairs.

    python -m lm.train --config=configs/quickstart.py --workdir=runs/quickstart
    python -m lm.train --config=configs/sft.py --workdir=runs/sft --config.checkpoint.init_from=runs/quickstart

The model and tokenizer come from checkpoint.init_from's run. The built-in data is this Python's
standard library as pairs: a public function's docstring (the prompt) and its `def` line (the
response); about 5,000 of them. Give your own with --config.data.source=text:DIR_OR_GLOB of .jsonl
files with {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}]} lines.
The loss and the evaluation cover the response tokens only.
"""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the SFT config (the quickstart's data sizes, a lower learning rate, model from init_from)."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "quickstart.py"))
  config.objective.name = "sft"
  config.objective.chat_template = "auto"
  config.checkpoint.init_model = True

  config.data.source = "builtin"  # with objective sft: the standard library's docstring -> signature pairs
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.data.validation_fraction = 0.05

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10
  config.optimizer.schedule = "linear"
  config.train.steps = 200
  config.checkpoint.every = 100
  config.eval.every = 50
  config.eval.steps = 0
  return config
