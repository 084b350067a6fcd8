"""What every `python -m lm.<command>` shares: flag parsing and one-line errors."""

import os
import re
import sys
from typing import Callable

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lm import config as config_lib


def run(main: Callable[..., None], takes_args: bool = False) -> None:
  """Parses flags and calls main(); a mistake the user can fix ends in one line, not a traceback.

  A command with `takes_args` gets its positional arguments: main(args).
  """

  flags_parsed = False

  def absl_main(argv: list[str]) -> None:
    nonlocal flags_parsed
    flags_parsed = True
    args = argv[1:]
    if args and not takes_args:
      raise app.UsageError(f"unexpected arguments: {' '.join(args)}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # jax's INFO lines would bury the progress lines
    try:
      main(args) if takes_args else main()
    except config_lib.ConfigError as error:
      _exit(f"error: config {error}")
    except config_lib.UserError as error:
      _exit(f"error: {error}")
    except OSError as error:  # a missing path, or a config file that failed to load
      _exit(f"error: {' '.join(str(error).split())}")

  try:
    app.run(absl_main)
  except (AttributeError, KeyError) as error:
    if flags_parsed:  # raised by the command itself: a bug, not the user's
      raise
    sys.exit(_unknown_field_message(error))


def _unknown_field_message(error: Exception) -> str:
  """One line for an override of a config field or section that does not exist (ml_collections' error)."""
  message = str(error.args[0]) if error.args else str(error)
  message = message.replace("\\n", "\n").replace("\\'", "'")  # the AttributeError holds an escaped repr
  field = message.splitlines()[0].strip("\"'") if message else "?"
  suggestion = re.search(r'Did you mean "([^"]+)"', message)
  overrides = [arg.split("=")[0] for arg in sys.argv[1:] if arg.startswith("--config.") and field in arg.split("=")[0]]
  hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""
  return f"error: unknown config field {' '.join(overrides) or field}{hint}; see configs/default.py for the fields"


def _exit(message: str) -> None:
  """Prints `message` and exits 1. Among several processes, at once: jax's exit would wait for the others,
  which are waiting for this one; the heartbeats that stop tell them to stop too."""
  if jax.process_count() > 1:
    print(message, file=sys.stderr, flush=True)
    os._exit(1)
  sys.exit(message)


def run_with_config(main: Callable[[ml_collections.ConfigDict], None]) -> None:
  """`run` for commands that take --config=configs/X.py [--config.a.b=value ...]: calls main(config)."""
  config_flag = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
  flags.mark_flags_as_required(["config"])

  def main_with_config() -> None:
    config_path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]  # path.py[:argument]
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"config file {config_path} not found")
    main(config_flag.value)

  run(main_with_config)
