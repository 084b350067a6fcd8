"""How long the training loop stalls when it saves a checkpoint, as a fraction of a step.

    python benchmarks/checkpoint_stall.py --config=configs/quickstart.py
    python benchmarks/checkpoint_stall.py --config=configs/gpt2_124m.py --config.data.batch_size=2 \
        --config.data.seq_len=128 --config.train.microbatches=1 --config.model.dtype=float32

Times every step to completion; a step that also saves (asynchronously, as training does) is
compared with the median step that does not. Target: under 10% of a step.
"""

import statistics
import tempfile
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from lm.train import checkpoint, loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 24, "Steps timed (after 2 of warm-up).")
_EVERY = flags.DEFINE_integer("every", 4, "Save every this many steps.")


def main(argv):
  del argv
  config = ml_collections.ConfigDict(_CONFIG.value)
  config.data.source = "synthetic"  # the stall is about the state, not the data
  run = loop.setup(config)
  state = run.init_state()
  batches = run.train_batches()
  num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  with tempfile.TemporaryDirectory() as workdir:
    checkpoints = checkpoint.manager(workdir, config.checkpoint)
    plain, saving = [], []
    for step in range(_STEPS.value + 2):
      start = time.perf_counter()
      state, metrics = run.train_step(state, next(batches), jax.random.key(step))
      saves = step >= 2 and step % _EVERY.value == 0
      if saves:
        checkpoint.save(checkpoints, step + 1, state, {}, config, {})
      jax.block_until_ready(metrics)
      if step >= 2:
        (saving if saves else plain).append(time.perf_counter() - start)
    checkpoints.wait_until_finished()
  step_seconds = statistics.median(plain)
  stall = statistics.mean(saving) - step_seconds
  print(
      f"parameters {num_params / 1e6:.1f}M | median step {step_seconds * 1e3:.0f} ms | "
      f"step with a save {statistics.mean(saving) * 1e3:.0f} ms | stall {100 * stall / step_seconds:.1f}% of a step"
  )


if __name__ == "__main__":
  app.run(main)
