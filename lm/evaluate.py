"""Held-out loss, perplexity and bits per byte; `python -m lm.evaluate --workdir=DIR`.

    python -m lm.evaluate --workdir=runs/quickstart            # the latest checkpoint
    python -m lm.evaluate --workdir=runs/quickstart --all      # every kept checkpoint

Prints one JSON object per checkpoint: step, loss, perplexity, bits_per_byte, tokens.
Bits per byte is the loss in bits per UTF-8 byte of the original text, comparable across tokenizers.
"""

import json
import math
from typing import Iterable

import jax
import numpy as np
from absl import flags

from lm import cli
from lm.config import UserError


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Loss (nats per token), perplexity and bits per byte from summed cross-entropy, tokens and bytes."""
  loss = float(sums["loss_sum"]) / float(sums["tokens"])
  return {
      "loss": loss,
      "perplexity": math.exp(loss),
      "bits_per_byte": float(sums["loss_sum"]) / (math.log(2) * float(sums["bytes"])),
      "tokens": int(sums["tokens"]),
  }


def evaluate(eval_step, params, batches: Iterable[dict], byte_lengths_V: np.ndarray) -> dict[str, float]:
  """Runs `eval_step` (lm.train.step.make_eval_step) over `batches` and summarizes the sums."""
  totals = None
  for batch in batches:
    sums = eval_step(params, batch, byte_lengths_V)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    raise UserError("no evaluation batches: the split holds fewer tokens than one batch (data.batch_size x data.seq_len)")
  return summarize(jax.device_get(totals))


def main() -> None:
  """`python -m lm.evaluate`: prints one JSON line per evaluated checkpoint."""
  workdir = flags.DEFINE_string("workdir", None, "A run's workdir.", required=True)
  step = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  split = flags.DEFINE_enum("split", "validation", ["validation", "train"], "Which split of the run's data.")
  max_batches = flags.DEFINE_integer("max_batches", 0, "Evaluate at most this many batches; 0 is the whole split.")
  every_checkpoint = flags.DEFINE_bool("all", False, "Evaluate every kept checkpoint, oldest first.")

  def evaluate_checkpoints() -> None:
    import lm

    loaded = lm.load(workdir.value, step.value)
    for checkpoint_step in loaded.steps() if every_checkpoint.value else [loaded.step]:
      result = loaded.at_step(checkpoint_step).evaluate(split.value, max_batches.value)
      print(json.dumps({"step": checkpoint_step, **result}), flush=True)

  cli.run(evaluate_checkpoints)


if __name__ == "__main__":
  main()
