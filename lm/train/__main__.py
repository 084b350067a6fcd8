"""`python -m lm.train --config=configs/X.py --workdir=DIR [--config.a.b=value ...]`."""

from absl import flags

from lm import cli
from lm.train import loop

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")

if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run_with_config(lambda config: loop.train(config, _WORKDIR.value))
