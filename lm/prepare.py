"""`python -m lm.prepare --config=configs/X.py`: train the tokenizer and build the tokenized shards.

`python -m lm.train` does the same on its own when they are missing; this does it ahead of time
(for example once, before starting many runs or hosts).
"""

import jax

from lm import cli, objectives
from lm import config as config_lib
from lm.data import examples, tfds_builder


def prepare(config) -> None:
  """Checks the config, then builds what is missing and says where it is."""
  config_lib.resolve_paths(config)
  config_lib.validate(config, jax.device_count())
  if config.data.source == "synthetic":
    print("data.source=synthetic needs no preparation")
    return
  objective = objectives.get(config)  # which decides the shards (text or examples) and the tokenizer's reserved pieces
  tokenizer, builder = tfds_builder.prepare(config.data, objective)
  print(f"Tokenizer: {tokenizer.path} ({tokenizer.vocab_size} pieces)")
  print(f"Shards: {builder.data_dir}")
  print(examples.summary(builder) if objective.reads_examples else tfds_builder.summary(builder))


if __name__ == "__main__":
  cli.run_with_config(prepare)
