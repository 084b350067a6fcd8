"""Hugging Face checkpoints from the command line.

    python -m lm.interop export --workdir=runs/quickstart [--step=N] --out=hf/quickstart [--overwrite]
    python -m lm.interop import hf/some_llama --workdir=runs/imported [--tokenizer=tokenizer.model] [--overwrite]

`export` writes what transformers' from_pretrained loads (LlamaForCausalLM, MixtralForCausalLM,
GPT2LMHeadModel, BertForMaskedLM or T5ForConditionalGeneration, safetensors, the tokenizer as a
LlamaTokenizer or, a tokenizer.json, as a PreTrainedTokenizerFast). `import` writes an lm run: config.json (its
objective the family's pretraining one: causal LM, masked LM for BERT, span corruption for T5), a
checkpoint at step 0 and the tokenizer (the folder's tokenizer.model, else its tokenizer.json),
which lm.load / lm.evaluate / lm.generate read and
`python -m lm.train --config=configs/from_run.py:WORKDIR` continues.

Neither writes into a folder that holds anything unless --overwrite is given, and neither ever
writes into the folder it reads. An export is written beside its --out and moved there when
complete, so a failed one leaves the old folder as it was.
"""

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

from lm import cli, distributed, inference, models, sharding
from lm import workdir as workdir_lib
from lm.config import DEFAULT_CONFIG_FILE, UserError, absolute_path, load_config_file
from lm.data import tokenizer as tokenizer_lib
from lm.interop import hf
from lm.train import checkpoint, optimizer, state as state_lib

# The objective an imported run trains, by family (the decoders: the default's, causal LM).
PRETRAINING_OBJECTIVES = {"bert": "mlm", "t5": "span_corruption"}

_WORKDIR = flags.DEFINE_string("workdir", None, "The lm run: read by export, written by import.", required=True)
_STEP = flags.DEFINE_integer("step", None, "export: the checkpoint step; default the latest.")
_OUT = flags.DEFINE_string("out", None, "export: the Hugging Face directory to write.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "import: a sentencepiece .model or a tokenizer.json, if HF_DIR has none.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace what the --out (export) or --workdir (import) folder holds.")


def _contains(outer: str, inner: str) -> bool:
  """Whether path `inner` is `outer` or lies inside it, links followed."""
  outer, inner = os.path.realpath(outer), os.path.realpath(inner)
  return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _refuse_overlap(target: str, source: str, flag: str, source_name: str) -> None:
  """Refuses to write `target` where it would write over `source`, which is being read."""
  if _contains(target, source) or _contains(source, target):
    raise UserError(f"{flag}={target} would write over {source_name} {source}, which is being read; choose another folder")


def _refuse_contents(target: str, flag: str, overwrite: bool, ignored: tuple[str, ...] = ()) -> list[str]:
  """What folder `target` holds (besides `ignored`); refused unless `overwrite`."""
  if os.path.exists(target) and not os.path.isdir(target):
    raise UserError(f"{flag}={target} is a file, not a folder")
  contents = sorted(set(os.listdir(target)) - set(ignored)) if os.path.isdir(target) else []
  if contents and not overwrite:
    raise UserError(f"{flag}={target} is not empty; pass --overwrite to replace what it holds, or choose a new folder")
  return contents


def export(workdir: str, step: int | None, out_dir: str, overwrite: bool = False) -> None:
  """Writes the run's checkpoint as a transformers model directory."""
  workdir, out_dir = absolute_path(workdir), absolute_path(out_dir)
  _refuse_overlap(out_dir, workdir, "--out", "the run")
  _refuse_contents(out_dir, "--out", overwrite)
  loaded = inference.load(workdir, step)
  if loaded.objective.num_classes:  # transformers' *ForCausalLM has no place for it
    raise UserError(
        f"{workdir} is a {loaded.objective.name} run: export writes causal language models, which would drop its "
        "classifier head"
    )
  tokenizer = loaded.tokenizer
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  partial = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=os.path.dirname(out_dir))
  try:
    if tokenizer:
      hf.save(loaded.config.model, loaded.params, partial, tokenizer.path, tokenizer.eos_id, tokenizer.vocab_size)
    else:
      hf.save(loaded.config.model, loaded.params, partial)
    if os.path.isdir(out_dir):  # --overwrite: only now that the new files are complete
      shutil.rmtree(out_dir)
    os.rename(partial, out_dir)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  distributed.log(f"Exported step {loaded.step} of {workdir} to {out_dir} ({loaded.config.model.family})")


def import_checkpoint(hf_dir: str, workdir: str, tokenizer_path: str | None, overwrite: bool = False) -> None:
  """Writes an lm run whose step-0 checkpoint holds the transformers model's weights."""
  hf_dir, workdir = absolute_path(hf_dir), absolute_path(workdir)
  _refuse_overlap(workdir, hf_dir, "--workdir", "the Hugging Face folder")
  model_config, params = hf.load(hf_dir)
  # A sentencepiece model first, as Llama 2's folders hold both (the names are those a workdir keeps).
  tokenizer_path = absolute_path(tokenizer_path) if tokenizer_path else workdir_lib.tokenizer_path(hf_dir)
  tokenizer = tokenizer_lib.load(tokenizer_path) if tokenizer_path else None
  with workdir_lib.Lock(workdir, "import"):  # a run training there, or another import, is refused by name
    for name in _refuse_contents(workdir, "--workdir", overwrite, ignored=(workdir_lib.LOCK_FILE,)):
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    _write_run(hf_dir, workdir, model_config, params, tokenizer)


def _write_run(hf_dir: str, workdir: str, model_config, params, tokenizer: tokenizer_lib.Tokenizer | None) -> None:
  """The run of an import: tokenizer, a step-0 checkpoint, config.json."""
  config = load_config_file(DEFAULT_CONFIG_FILE)
  config.model = model_config
  config.objective.name = PRETRAINING_OBJECTIVES.get(model_config.family, config.objective.name)
  if tokenizer:
    config.data.tokenizer = tokenizer.copy_to(workdir)
  else:
    distributed.log(f"No tokenizer.model or tokenizer.json in {hf_dir}; pass --tokenizer to evaluate or train on text")

  mesh = inference.inference_mesh(config)  # FSDP: a large model is never copied whole onto each device
  axis_rules = sharding.rules(config.mesh)
  model = models.get(config.model)
  tx, _ = optimizer.make(config.optimizer, config.train.steps)
  abstract = state_lib.abstract_state(model, tx, mesh, axis_rules)
  params = jax.device_put(params, sharding.shardings_of(abstract).params)
  opt_state = jax.jit(lambda params: tx.init(optimizer.to_float32(params)), out_shardings=sharding.shardings_of(abstract).opt_state)(params)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
  saver = checkpoint.Saver(checkpoint.manager(workdir, config.checkpoint))
  data = {"dataset": f"imported from {hf_dir}", "seed": config.data.seed, "next_step": 0}
  saver.save(0, state, data, config, {"tokens_seen": 0, "train_seconds": 0.0})
  saver.finish()
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
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
      raise app.UsageError("python -m lm.interop export --workdir=DIR [--step=N] --out=HF_DIR [--overwrite]")
    export(_WORKDIR.value, _STEP.value, _OUT.value, _OVERWRITE.value)
  else:
    if len(args) != 2:
      raise app.UsageError("python -m lm.interop import HF_DIR --workdir=DIR [--tokenizer=PATH] [--overwrite]")
    import_checkpoint(args[1], _WORKDIR.value, _TOKENIZER.value, _OVERWRITE.value)


if __name__ == "__main__":
  cli.run(main, takes_args=True)
