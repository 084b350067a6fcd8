"""Seconds to lower and compile the training step for several depths, with and without scan over layers.

    python benchmarks/compile_time.py --config=configs/quickstart.py --layers=4,48

With scan_layers the step holds one layer's program whatever the depth, so 48 layers compile in
about the time of 4; unrolled, compile time grows with depth.
"""

import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from lm.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.")
_LAYERS = flags.DEFINE_list("layers", ["4", "48"], "Depths to compile.")


def compile_seconds(config: ml_collections.ConfigDict) -> float:
  """Wall time to lower and compile the training step of `config`."""
  run = loop.setup(config)
  batch = next(run.train_batches())
  start = time.perf_counter()
  run.train_step.lower(run.abstract_state, batch, jax.random.key(0)).compile()
  return time.perf_counter() - start


def main(argv):
  del argv
  print(f"{'layers':>6} {'scan':>5} {'compile s':>10}")
  for num_layers in map(int, _LAYERS.value):
    for scan in (True, False):
      config = ml_collections.ConfigDict(_CONFIG.value)
      config.model.num_layers = num_layers
      config.model.scan_layers = scan
      print(f"{num_layers:>6} {str(scan):>5} {compile_seconds(config):>10.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
