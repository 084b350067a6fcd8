"""The exact config of an existing run (its WORKDIR/config.json): continue, fine-tune or evaluate it.

    python -m lm.train --config=configs/from_run.py:runs/imported --workdir=runs/finetune \
        --config.checkpoint.init_from=runs/imported --config.data.source=text:~/my_corpus

The part after ':' is the run's workdir; overrides apply on top as with any config. Fields that
the run's lm did not have yet take their defaults, so they can be overridden too.
"""

import json
import os

import ml_collections

from lm.config import DEFAULT_CONFIG_FILE, load_config_file


def _as_tuples(value):
  """JSON's lists back into the tuples the config holds."""
  return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """Returns the config that `workdir`'s run was (last) started with, on top of the defaults."""
  with open(os.path.join(os.path.expanduser(workdir), "config.json")) as f:
    saved = json.load(f)
  config = load_config_file(DEFAULT_CONFIG_FILE)
  for section, fields in saved.items():
    if section not in config:
      config[section] = ml_collections.ConfigDict()
    for field, value in fields.items():
      config[section][field] = _as_tuples(value)
  return config
