"""Objectives: what a model learns from its data. One module per objective, all with one interface.

An objective owns three things:
  - how a .jsonl record becomes a tokenized example (`example`), which lm.data.examples packs into
    batch rows (causal LM reads plain text instead, as one token stream cut into windows);
  - its loss sums over a batch, from the model's outputs (`loss_sums`), for the train step;
  - its evaluation sums (`eval_sums`) and the metrics they give (`summarize`).
Every batch has the keys and shapes of lm.data.batch; the objective decides what `targets` and
`weights` hold.
"""

import ml_collections

from lm.objectives.base import Example, Objective
from lm.objectives.causal_lm import CausalLM
from lm.objectives.classification import Classification
from lm.objectives.sft import SFT

_BY_NAME = {"causal_lm": CausalLM, "sft": SFT, "classification": Classification}


def get(config: ml_collections.ConfigDict) -> Objective:
  """The objective a config names (objective.name; configs from before objectives existed: causal LM)."""
  objective_config = config.get("objective") or ml_collections.ConfigDict({"name": "causal_lm"})
  return _BY_NAME[objective_config.name](objective_config)


__all__ = ["CausalLM", "Classification", "Example", "Objective", "SFT", "get"]
