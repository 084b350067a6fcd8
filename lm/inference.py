"""`lm.load(workdir)`: a checkpoint on this machine's devices, to evaluate and generate from.

The one way the command-line tools and notebooks load a checkpoint. Parameters are restored
straight into shards over this machine's devices (FSDP), whatever mesh trained them.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from lm import evaluate as evaluate_lib
from lm import objectives
from lm.objectives import sft, span_corruption
from lm import generate as generate_lib
from lm import sharding
from lm import workdir as workdir_lib
from lm import config as config_lib
from lm.config import UserError, absolute_path
from lm.data import pipeline, tfds_builder, tokenizer as tokenizer_lib
from lm import models
from lm import checkpoints as checkpoints_lib



def inference_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """FSDP over as many devices as the model's width splits evenly over: any model, any device count."""
  devices = jax.devices()
  devices = devices[: math.gcd(len(devices), config.model.embed_dim)]  # the default rules shard "embed" over fsdp
  mesh_config = ml_collections.ConfigDict(config.mesh)
  mesh_config.update({axis: 1 for axis in config_lib.mesh_axes(mesh_config)})
  mesh_config.update(fsdp=-1, dcn_data=1, dcn_fsdp=1)
  return sharding.make_mesh(mesh_config, devices)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A run's config, tokenizer and parameters at one step, ready on the local devices."""

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer | None  # None for a run on synthetic data
  objective: objectives.Objective
  model: nn.Module  # lm.models.get(config.model)
  mesh: Mesh
  axis_rules: sharding.Rules
  params: dict = dataclasses.field(repr=False)
  eval_step: sharding.MeshJit = dataclasses.field(repr=False)  # (params, batch, byte_lengths_V) -> sums
  _checkpoints: ocp.CheckpointManager = dataclasses.field(repr=False)

  @property
  def data_parallel(self) -> int:
    """Batches are split over this many devices, so their rows come in multiples of it."""
    return sharding.data_parallel(self.mesh, self.axis_rules)

  def steps(self) -> list[int]:
    """Every kept checkpoint step of the run, oldest first."""
    return sorted(self._checkpoints.all_steps())

  def at_step(self, step: int) -> "LoadedModel":
    """The same run at another checkpoint step (compiled functions are reused)."""
    if step == self.step:
      return self
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), self.params)
    params = checkpoints_lib.restore_parts(self._checkpoints, step, {"params": abstract}, "step")["params"]
    return dataclasses.replace(self, step=step, params=params)

  def _require_tokenizer(self) -> tokenizer_lib.Tokenizer:
    if self.tokenizer is None:
      raise UserError(f"{self.workdir} was trained on synthetic data: it has no tokenizer and no text to evaluate")
    return self.tokenizer

  @functools.cached_property
  def _byte_lengths(self) -> np.ndarray:
    return self._require_tokenizer().byte_lengths(self.config.model.vocab_size)

  def evaluate(self, split: str = "validation", max_batches: int = 0) -> dict[str, float]:
    """The objective's metrics over a split of the run's data (all of it if max_batches is 0): for language
    models loss, perplexity, bits per byte and tokens; for classification loss, accuracy and F1."""
    config = self.config.copy_and_resolve_references()
    config.data.tokenizer = self._require_tokenizer().path
    config.data.batch_size = -(-config.data.batch_size // self.data_parallel) * self.data_parallel
    # The data the run was trained on, where it still is; rebuilt (from the same source) only if it is gone.
    dataset = workdir_lib.recorded_dataset(self.workdir) or tfds_builder.prepare(config.data, self.objective)[1]
    batches = pipeline.eval_batches(config, self.mesh, self.axis_rules, dataset, self.tokenizer, max_batches, split)
    return evaluate_lib.evaluate(self.eval_step, self.params, batches, self._byte_lengths, self.objective)

  def loss(self, texts: list[str]) -> dict[str, float]:
    """Loss, perplexity and bits per byte of each text read as a document of its own, all texts together."""
    tokenizer = self._require_tokenizer()
    if not isinstance(self.objective, objectives.CausalLM):
      raise UserError(f"{self.workdir} was trained for {self.objective.name}, not to predict text: use evaluate()")
    documents = [[tokenizer.eos_id] + _encode(tokenizer, text, "text", number) for number, text in enumerate(texts, 1)]
    length = max(len(document) for document in documents) - 1
    num_rows = -(-len(documents) // self.data_parallel) * self.data_parallel
    batch = {name: np.zeros((num_rows, length), np.int32) for name in ("inputs", "targets", "segment_ids", "positions")}
    batch["weights"] = np.zeros((num_rows, length), np.float32)
    for row, document in enumerate(documents):
      size = len(document) - 1
      batch["inputs"][row, :size] = document[:-1]
      batch["targets"][row, :size] = document[1:]
      batch["segment_ids"][row, :size] = 1
      batch["positions"][row, :size] = np.arange(size)
      batch["weights"][row, :size] = 1.0
    return evaluate_lib.evaluate(self.eval_step, self.params, [batch], self._byte_lengths, self.objective)

  def generate(
      self,
      prompts: list[str],
      max_new_tokens: int = 200,
      temperature: float = 0.8,
      top_k: int = 0,
      top_p: float = 1.0,
      seed: int = 0,
  ) -> list[str]:
    """The continuation of each prompt (each read as the start of a document), up to the end of the document.

    A run fine-tuned by SFT answers instead: each prompt is a user message in its chat template, and
    the reply ends with the template's end of turn. An encoder-decoder (T5) reads each prompt (then EOS)
    with its encoder and returns what its decoder writes, up to EOS: for span corruption, the spans
    that fill the prompt's <extra_id_k> pieces, each after its sentinel.
    """
    tokenizer = self._require_tokenizer()
    if isinstance(self.objective, objectives.SpanCorruption):
      inputs = [_encode(tokenizer, prompt, "prompt", number) + [tokenizer.eos_id] for number, prompt in enumerate(prompts, 1)]
      new_ids = generate_lib.generate_encoder_decoder_ids(
          self.model, self.params, self.mesh, self.axis_rules, inputs, max_new_tokens=max_new_tokens,
          eos_id=tokenizer.eos_id, start_id=span_corruption.decoder_start_id(tokenizer), vocab_size=tokenizer.vocab_size,
          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
      )  # fmt: skip
      return [tokenizer.decode(ids) for ids in new_ids]
    if not isinstance(self.objective, objectives.CausalLM):
      raise UserError(f"{self.workdir} was trained for {self.objective.name}, not to write text: use evaluate()")
    if isinstance(self.objective, objectives.SFT):
      template = sft.template_name(self.objective.config.chat_template, tokenizer)
      for number, prompt in enumerate(prompts, 1):
        _encode(tokenizer, prompt, "prompt", number)  # text that is not UTF-8 is named
      asks = [sft.reply_prompt(prompt, tokenizer, template) for prompt in prompts]
      prompt_ids, stop_id = [ids for ids, _ in asks], asks[0][1]
    else:
      prompt_ids = [[tokenizer.eos_id] + _encode(tokenizer, prompt, "prompt", number) for number, prompt in enumerate(prompts, 1)]
      stop_id = tokenizer.eos_id
    new_ids = generate_lib.generate_ids(
        self.model, self.params, self.mesh, self.axis_rules, prompt_ids, max_new_tokens=max_new_tokens,
        eos_id=stop_id, vocab_size=tokenizer.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed,
    )  # fmt: skip
    return [tokenizer.decode(ids) for ids in new_ids]


def _encode(tokenizer: tokenizer_lib.Tokenizer, text: str, what: str, number: int) -> list[int]:
  """The token ids of the `number`-th `what`; one that is not UTF-8 is a UserError that says which."""
  try:
    return tokenizer.encode(text)
  except UserError as error:
    raise UserError(f"{what} {number}: {error}") from None


def load(workdir: str, step: int | None = None) -> LoadedModel:
  """The run in `workdir` at checkpoint `step` (default: the latest), on this machine's devices."""
  workdir = absolute_path(workdir)
  checkpoints = checkpoints_lib.read_only_manager(workdir)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
  if step not in checkpoints.all_steps():
    raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoints.directory}; kept: {sorted(checkpoints.all_steps())}")
  checkpoints_lib.check_intact(checkpoints, step)
  config = checkpoints_lib.restore_config(checkpoints, step)
  tokenizer_path = workdir_lib.tokenizer_path(workdir)
  tokenizer = tokenizer_lib.load(tokenizer_path) if tokenizer_path else None
  objective = objectives.get(config)
  model = models.get(config.model, num_classes=objective.num_classes)
  mesh = inference_mesh(config)
  axis_rules = sharding.rules(config.mesh)
  abstract = sharding.abstract_params(model, mesh, axis_rules)
  params = checkpoints_lib.restore_parts(checkpoints, step, {"params": abstract}, "step")["params"]
  eval_step = evaluate_lib.make_eval_step(model, objective, mesh, axis_rules, sharding.shardings_of(abstract))
  return LoadedModel(workdir, step, config, tokenizer, objective, model, mesh, axis_rules, params, eval_step, checkpoints)
