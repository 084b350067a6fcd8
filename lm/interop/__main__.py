"""Hugging Face checkpoints from the command line.

    python -m lm.interop export --workdir=runs/quickstart [--step=N] --out=hf/quickstart
    python -m lm.interop import hf/some_llama --workdir=runs/imported [--tokenizer=tokenizer.model]

`export` writes what transformers' from_pretrained loads (LlamaForCausalLM or GPT2LMHeadModel,
safetensors, the tokenizer as a LlamaTokenizer). `import` writes an lm run: config.json, a
checkpoint at step 0 and the tokenizer, which lm.load / lm.evaluate / lm.generate read and
`python -m lm.train --config=configs/from_run.py:WORKDIR` continues.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from lm import cli, distributed, inference, sharding
from lm.config import DEFAULT_CONFIG_FILE, load_config_file
from lm.interop import hf
from lm.models import Transformer
from lm.train import checkpoint, optimizer, state as state_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The lm run: read by export, written by import.", required=True)
_STEP = flags.DEFINE_integer("step", None, "export: the checkpoint step; default the latest.")
_OUT = flags.DEFINE_string("out", None, "export: the Hugging Face directory to write.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "import: a sentencepiece .model, if the checkpoint has none.")


def export(workdir: str, step: int | None, out_dir: str) -> None:
  """Writes the run's checkpoint as a transformers model directory."""
  loaded = inference.load(workdir, step)
  tokenizer = loaded.tokenizer
  if tokenizer:
    hf.save(loaded.config.model, loaded.params, out_dir, tokenizer.path, tokenizer.eos_id, tokenizer.vocab_size)
  else:
    hf.save(loaded.config.model, loaded.params, out_dir)
  distributed.log(f"Exported step {loaded.step} of {workdir} to {out_dir} ({loaded.config.model.family})")


def import_checkpoint(hf_dir: str, workdir: str, tokenizer_path: str | None) -> None:
  """Writes an lm run whose step-0 checkpoint holds the transformers model's weights."""
  model_config, params = hf.load(hf_dir)
  config = load_config_file(DEFAULT_CONFIG_FILE)
  config.model = model_config
  os.makedirs(workdir, exist_ok=True)
  tokenizer_path = tokenizer_path or os.path.join(hf_dir, "tokenizer.model")
  if os.path.isfile(tokenizer_path):
    shutil.copyfile(tokenizer_path, os.path.join(workdir, inference.TOKENIZER_FILE))
    config.data.tokenizer = os.path.abspath(os.path.join(workdir, inference.TOKENIZER_FILE))
  else:
    distributed.log(f"No sentencepiece tokenizer ({tokenizer_path}); pass --tokenizer to evaluate or train on text")

  mesh = inference.inference_mesh(config)  # FSDP: a large model is never copied whole onto each device
  axis_rules = sharding.rules(config.mesh)
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  tx, _ = optimizer.make(config.optimizer, config.train.steps)
  abstract = state_lib.abstract_state(model, tx, mesh, axis_rules)
  params = jax.device_put(params, state_lib.shardings_of(abstract).params)
  opt_state = jax.jit(tx.init, out_shardings=state_lib.shardings_of(abstract).opt_state)(params)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
  checkpoints = checkpoint.manager(workdir, config.checkpoint)
  data = {"dataset": f"imported from {os.path.abspath(hf_dir)}", "seed": config.data.seed, "next_step": 0}
  checkpoint.save(checkpoints, 0, state, data, config, {"tokens_seen": 0, "train_seconds": 0.0})
  checkpoints.wait_until_finished()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  distributed.log(
      f"Imported {hf_dir} ({config.model.family}, {sum(p.size for p in jax.tree.leaves(params)):,} parameters) into {workdir}.\n"
      f"Continue training: python -m lm.train --config=configs/from_run.py:{workdir} --workdir={workdir}"
  )


def main(args: list[str]) -> None:
  if not args or args[0] not in ("export", "import"):
    raise app.UsageError("python -m lm.interop export --workdir=DIR --out=HF_DIR | import HF_DIR --workdir=DIR")
  if args[0] == "export":
    if len(args) != 1 or not _OUT.value:
      raise app.UsageError("python -m lm.interop export --workdir=DIR [--step=N] --out=HF_DIR")
    export(_WORKDIR.value, _STEP.value, _OUT.value)
  else:
    if len(args) != 2:
      raise app.UsageError("python -m lm.interop import HF_DIR --workdir=DIR [--tokenizer=PATH]")
    import_checkpoint(args[1], _WORKDIR.value, _TOKENIZER.value)


if __name__ == "__main__":
  cli.run(main, takes_args=True)
