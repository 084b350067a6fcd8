"""Held-out metrics of a run's objective; `python -m lm.evaluate --workdir=DIR`.

    python -m lm.evaluate --workdir=runs/quickstart            # the latest checkpoint
    python -m lm.evaluate --workdir=runs/quickstart --all      # every kept checkpoint

Prints one JSON object per checkpoint: its step and the objective's metrics. Causal LM and SFT:
loss, perplexity, bits_per_byte (the loss in bits per UTF-8 byte of the scored text, comparable
across tokenizers) and tokens; classification: loss, accuracy, macro_f1, f1_<class> and examples.
"""

import json
from typing import Iterable

import functools

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from lm import cli, sharding
from lm.config import UserError
from lm.objectives import Objective


def eval_step(params, batch: dict[str, jax.Array], byte_lengths_V: jax.Array, *, model: nn.Module, objective: Objective) -> dict[str, jax.Array]:
  """The objective's evaluation sums over a batch (they add up over batches)."""
  return objective.eval_sums(params, model, batch, byte_lengths_V)


def make_eval_step(
    model: nn.Module, objective: Objective, mesh: Mesh, axis_rules: sharding.Rules, param_shardings
) -> sharding.MeshJit:
  """Jits `eval_step` on the params' shardings; call as step(params, batch, byte_lengths_V) -> sums."""
  batch_sharding = sharding.logical_sharding(mesh, axis_rules, sharding.BATCH_AXES)
  jitted = jax.jit(
      functools.partial(eval_step, model=model, objective=objective),
      in_shardings=(param_shardings, batch_sharding, sharding.replicated(mesh)),
      out_shardings=sharding.replicated(mesh),
  )
  return sharding.MeshJit(jitted, mesh, axis_rules)


def evaluate(eval_step, params, batches: Iterable[dict], byte_lengths_V: np.ndarray, objective: Objective) -> dict[str, float]:
  """Runs `eval_step` (make_eval_step) over `batches` and summarizes the sums as `objective` does."""
  totals = None
  for batch in batches:
    sums = eval_step(params, batch, byte_lengths_V)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    raise UserError(
        "no evaluation batches: the split holds no examples, or fewer tokens than one batch (data.batch_size x data.seq_len)"
    )
  return objective.summarize(jax.device_get(totals))


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
