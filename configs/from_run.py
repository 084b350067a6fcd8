"""The exact config of an existing run (its WORKDIR/config.json): continue, fine-tune or evaluate it.

    python -m lm.train --config=configs/from_run.py:runs/imported --workdir=runs/finetune \
        --config.checkpoint.init_from=runs/imported --config.data.source=text:~/my_corpus

The part after ':' is the run's workdir; overrides apply on top as with any config.
"""

import json
import os

import ml_collections


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """Returns the config that `workdir`'s run was (last) started with."""
  with open(os.path.join(os.path.expanduser(workdir), "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))
