"""Objectives: what a model learns from its data. One module per objective, all with one interface.

An objective owns three things:
  - how a .jsonl record becomes a tokenized example (`example`), which lm.data.examples packs into
    batch rows; or, for those that read plain text as one token stream cut into windows (causal LM,
    masked LM, span corruption), how windows become rows (`rows_from_stream`);
  - its loss sums over a batch, from the model's outputs (`loss_sums`), for the train step;
  - its evaluation sums (`eval_sums`) and the metrics they give (`summarize`).
Every batch has the keys and shapes of lm.data.batch; the objective decides what `targets` and
`weights` hold.
"""

import ml_collections

from lm import models
from lm.objectives.base import Example, Objective
from lm.objectives.causal_lm import CausalLM
from lm.objectives.classification import Classification
from lm.objectives.mlm import MaskedLM
from lm.objectives.sft import SFT
from lm.objectives.span_corruption import SpanCorruption


def get(config: ml_collections.ConfigDict) -> Objective:
  """The objective a config names (objective.name; configs from before objectives existed: causal LM)."""
  objective_config = config.get("objective") or ml_collections.ConfigDict({"name": "causal_lm"})
  name = objective_config.name
  if name == "classification":
    encoder = "model" in config and config.model.family in models.ENCODER_FAMILIES
    return Classification(objective_config, at_first_token=encoder)
  if name == "span_corruption":
    return SpanCorruption(objective_config, config.data.seq_len)
  return {"causal_lm": CausalLM, "sft": SFT, "mlm": MaskedLM}[name](objective_config)


__all__ = ["CausalLM", "Classification", "Example", "MaskedLM", "Objective", "SFT", "SpanCorruption", "get"]
