"""Fine-tuning a run as a text classifier, on labelled .jsonl: {"text": ..., "label": ...} per line.

    python -m lm.train --config=configs/classify.py --workdir=runs/classify \
        --config.checkpoint.init_from=runs/quickstart --config.data.source=text:~/labelled \
        --config.objective.class_names=negative,positive
    python -m lm.evaluate --workdir=runs/classify        # loss, accuracy, macro_f1, f1_<class>

Labels are class numbers (0 .. objective.num_classes - 1) or the names in objective.class_names.
The model and tokenizer come from checkpoint.init_from's run, as in configs/sft.py (whose
training settings this shares); a linear head on the text's last token (an encoder's first, BERT's [CLS]) is
added and trained with it.
"""

import os

import ml_collections

from lm.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  """Returns the classification config (set data.source and the classes)."""
  config = load_config_file(os.path.join(os.path.dirname(__file__), "sft.py"))
  config.objective.name = "classification"
  config.objective.num_classes = 2
  config.data.source = "text:labelled"  # a folder or glob of .jsonl files
  config.data.validation_fraction = 0.1
  return config
