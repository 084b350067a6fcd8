"""`python -m lm.train --config=configs/X.py --workdir=DIR [--config.a.b=value ...]`."""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lm import config as config_lib
from lm.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # jax's INFO lines would bury the progress lines
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.isfile(config_path):
    sys.exit(f"error: config file {config_path} not found")
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as error:
    sys.exit(f"error: config {error}")
  except OSError as error:  # includes a config file that failed to load
    sys.exit(f"error: {' '.join(str(error).split())}")


def main() -> None:
  """Runs the CLI; an override of a config field that does not exist ends in one line, not a traceback."""
  try:
    app.run(_main)
  except AttributeError as error:
    field = str(error).strip("\"'")
    overrides = [arg.split("=")[0] for arg in sys.argv[1:] if arg.startswith("--config.") and field in arg]
    sys.exit(f"error: unknown config field {' '.join(overrides) or field}; see configs/default.py for the fields")


if __name__ == "__main__":
  main()
