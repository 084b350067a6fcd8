"""The quickstart with a Mixtral-style mixture of experts: 8 experts, 2 per token, on a laptop CPU.

    python -m lm.train --config=configs/moe_tiny.py --workdir=runs/moe_tiny

Each block's MLP becomes 8 SwiGLU experts of the quickstart's width over 4 (so a token's two experts
cost half the quickstart's MLP); the log line shows the least and most loaded expert's share of the
token choices times 8 ("experts 0.85-1.17x": 1 is balanced). On 8 simulated devices,
`--config.mesh.expert=8` puts one expert on each (the batch splits over them elsewhere).
"""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the tiny mixture-of-experts config."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "quickstart.py"))
  config.model.num_experts = 8
  config.model.experts_per_token = 2
  config.model.mlp_dim = 96  # per expert
  config.train.steps = 300
  return config
