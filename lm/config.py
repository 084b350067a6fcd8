"""Checks a config before anything is compiled, so a config that cannot work fails in one line."""

import importlib.util
import math
import os

import ml_collections

from lm import models
from lm.models import attention, transformer

# Every config starts from this file; it documents each field. It lives in the checkout, next to lm/.
DEFAULT_CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")

DCN_AXES = ("data", "fsdp")  # the mesh axes that can also span slices / hosts (mesh.dcn_<axis>)
FAMILIES = models.FAMILIES
DATA_SOURCES = ("builtin", "synthetic", "text:<dir or glob>", "tfds:<name>[:<version>]")
TOKENIZER_TYPES = ("bpe", "unigram")
ROPE_SCALINGS = ("none", "linear", "llama3")
OBJECTIVES = ("causal_lm", "sft", "classification", "mlm", "span_corruption")
# The model families each objective trains.
OBJECTIVE_FAMILIES = {
    "causal_lm": models.DECODER_FAMILIES,
    "sft": models.DECODER_FAMILIES,
    "classification": models.DECODER_FAMILIES + models.ENCODER_FAMILIES,
    "mlm": models.ENCODER_FAMILIES,
    "span_corruption": models.ENCODER_DECODER_FAMILIES,
}
CHAT_TEMPLATES = ("auto", "llama3", "plain")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
NO_WEIGHT_DECAY_KINDS = ("norm", "bias", "embedding")
DTYPES = ("float32", "bfloat16", "float16")


class UserError(Exception):
  """A failure the user can fix; the commands print its message as one line, without a traceback."""


class ConfigError(UserError, ValueError):
  """A config field that cannot work; the message names the field and the fix."""


def absolute_path(path: str) -> str:
  """`path` with `~` and relative parts resolved, once, to the absolute path every later use sees."""
  return os.path.abspath(os.path.expanduser(path))


def resolve_paths(config: ml_collections.ConfigDict) -> None:
  """Makes every path of the config absolute, before anything reads or writes one (and config.json records it)."""
  data = config.data
  data.data_dir = absolute_path(data.data_dir)
  for field in ("tokenizer", "tfds_data_dir"):
    if data[field]:
      data[field] = absolute_path(data[field])
  if data.source.startswith("text:"):
    data.source = "text:" + absolute_path(data.source[len("text:") :])
  if config.checkpoint.init_from:
    config.checkpoint.init_from = absolute_path(config.checkpoint.init_from)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Returns get_config() of a config file (configs/*.py), whatever the working directory."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"{field}: {message}")


def _finite_at_least(value: float, lowest: float, field: str, inclusive: bool = True) -> None:
  """A finite number, >= lowest (or > lowest when not inclusive); NaN fails every comparison."""
  ok = math.isfinite(value) and (value >= lowest if inclusive else value > lowest)
  _require(ok, field, f"must be a finite number {'>=' if inclusive else '>'} {lowest:g}, got {value}")


def _one_of(value: str, choices: tuple[str, ...], field: str) -> None:
  _require(value in choices, field, f"unknown value {value!r}; choose one of {', '.join(choices)}")


def mesh_axes(mesh: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The mesh's axis names, outermost first, as mesh.axes declares them; each has its size in mesh.<axis>."""
  axes = tuple(mesh.axes)
  for axis in axes:
    _require(isinstance(mesh.get(axis), int), "mesh.axes", f"axis {axis!r} needs its size as an integer field mesh.{axis}")
  _require(len(set(axes)) == len(axes), "mesh.axes", f"names an axis twice: {axes}")
  for logical, mesh_axis in mesh.logical_axis_rules:
    for name in (mesh_axis,) if isinstance(mesh_axis, str) else mesh_axis or ():
      _require(name in axes, "mesh.logical_axis_rules", f"{logical!r} maps to mesh axis {name!r}, which mesh.axes {axes} lacks")
  return axes


def batch_axes(mesh: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The mesh axes that split the batch: those the rules map "activation_batch" to."""
  mapped = dict(mesh.logical_axis_rules).get("activation_batch")
  return (mapped,) if isinstance(mapped, str) else tuple(mapped or ())


def mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
  """Resolves the mesh sizes: (per-slice sizes with -1 filled in, across-slice sizes), by axis name."""
  axes = mesh_axes(mesh)
  dcn = {axis: mesh.get(f"dcn_{axis}", 1) if axis in DCN_AXES else 1 for axis in axes}
  for axis in DCN_AXES:
    _require(dcn.get(axis, 1) >= 1, f"mesh.dcn_{axis}", f"must be >= 1, got {dcn.get(axis)}")
  num_slices = math.prod(dcn.values())
  _require(
      num_devices % num_slices == 0,
      "mesh.dcn_data",
      f"dcn_data * dcn_fsdp = {num_slices} does not divide the {num_devices} devices",
  )
  devices_per_slice = num_devices // num_slices

  ici = {axis: mesh[axis] for axis in axes}
  for axis, size in ici.items():
    _require(size == -1 or size >= 1, f"mesh.{axis}", f"must be -1 (all remaining devices) or >= 1, got {size}")
  fill_axes = [axis for axis, size in ici.items() if size == -1]
  if len(fill_axes) > 1:
    raise ConfigError(f"mesh.{fill_axes[1]}: only one mesh axis may be -1, but {' and '.join(fill_axes)} are")
  fixed = math.prod(size for size in ici.values() if size != -1)
  if fill_axes:
    _require(
        devices_per_slice % fixed == 0,
        f"mesh.{fill_axes[0]}",
        f"-1 cannot fill the mesh: the other axes ({', '.join(f'{a}={ici[a]}' for a in axes if ici[a] != -1)}) "
        f"multiply to {fixed}, which does not divide the {devices_per_slice} devices per slice",
    )
    ici[fill_axes[0]] = devices_per_slice // fixed
  _require(
      math.prod(ici.values()) == devices_per_slice,
      "mesh",
      f"data*fsdp*tensor*sequence = {math.prod(ici.values())} but there are {devices_per_slice} devices "
      "per slice; set one axis to -1 or make the product match",
  )
  return ici, dcn


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError naming the first field that cannot work on `num_devices` devices."""
  model, data, opt, train = config.model, config.data, config.optimizer, config.train

  _one_of(model.family, FAMILIES, "model.family")
  _one_of(model.attention, tuple(attention.KERNELS), "model.attention")
  _one_of(model.remat_policy, tuple(transformer.REMAT_POLICIES), "model.remat_policy")
  _one_of(model.dtype, DTYPES, "model.dtype")
  _one_of(model.param_dtype, DTYPES, "model.param_dtype")
  _require(model.vocab_size >= 0, "model.vocab_size", f"must be >= 0 (0: from the tokenizer), got {model.vocab_size}")
  for field in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "mlp_dim", "max_seq_len"):
    _require(model[field] >= 1, f"model.{field}", f"must be >= 1, got {model[field]}")
  _require(model.get("head_dim", 0) >= 0, "model.head_dim", f"must be >= 0 (0: embed_dim // num_heads), got {model.get('head_dim')}")
  _require(
      model.get("head_dim", 0) > 0 or model.embed_dim % model.num_heads == 0,
      "model.num_heads",
      f"{model.num_heads} heads do not divide model.embed_dim={model.embed_dim}; pick a divisor (or set model.head_dim)",
  )
  if model.family == "t5":
    _require(model.num_decoder_layers >= 0, "model.num_decoder_layers", f"must be >= 0 (0: num_layers), got {model.num_decoder_layers}")
    _require(model.relative_buckets >= 4, "model.relative_buckets", f"must be >= 4, got {model.relative_buckets}")
    _require(
        model.relative_max_distance > model.relative_buckets // 4,
        "model.relative_max_distance",
        f"must be > relative_buckets / 4 = {model.relative_buckets // 4} (where exact buckets end), got {model.relative_max_distance}",
    )
  if model.family == "bert":
    _require(model.type_vocab_size >= 1, "model.type_vocab_size", f"must be >= 1, got {model.type_vocab_size}")
  _require(
      model.num_heads % model.num_kv_heads == 0,
      "model.num_kv_heads",
      f"{model.num_kv_heads} key/value heads do not divide model.num_heads={model.num_heads}; pick a divisor",
  )
  if model.family == "llama":
    head_dim = model.get("head_dim", 0) or model.embed_dim // model.num_heads
    _require(head_dim % 2 == 0, "model.num_heads", f"rotary embeddings need an even head_dim, got {head_dim}")
  rope_scaling = model.get("rope_scaling", "none")  # configs saved before it existed lack it
  _one_of(rope_scaling, ROPE_SCALINGS, "model.rope_scaling")
  if rope_scaling != "none":
    _require(model.family == "llama", "model.rope_scaling", f"{model.family} has no rotary embeddings; set none")
    _finite_at_least(model.rope_scaling_factor, 0.0, "model.rope_scaling_factor", inclusive=False)
  if rope_scaling == "llama3":
    _finite_at_least(model.rope_low_freq_factor, 0.0, "model.rope_low_freq_factor", inclusive=False)
    _require(
        math.isfinite(model.rope_high_freq_factor) and model.rope_high_freq_factor > model.rope_low_freq_factor,
        "model.rope_high_freq_factor",
        f"must be > model.rope_low_freq_factor={model.rope_low_freq_factor}, got {model.rope_high_freq_factor}",
    )
    original = model.rope_original_max_seq_len
    _require(original >= 1, "model.rope_original_max_seq_len", f"must be >= 1, got {original}")
  _require(
      not (model.fp8_matmuls and model.dtype == "float16"),
      "model.fp8_matmuls",
      "fp8 scales underflow in float16; compute in bfloat16 (model.dtype) or leave fp8 off",
  )
  _finite_at_least(model.norm_eps, 0.0, "model.norm_eps", inclusive=False)
  _finite_at_least(model.init_std, 0.0, "model.init_std", inclusive=False)
  _require(model.scan_unroll >= 0, "model.scan_unroll", f"must be >= 0 (0: auto), got {model.scan_unroll}")
  _require(model.cudnn_max_documents >= 1, "model.cudnn_max_documents", f"must be >= 1, got {model.cudnn_max_documents}")
  _require(model.loss_chunk_len >= 0, "model.loss_chunk_len", f"must be >= 0 (0: all positions at once), got {model.loss_chunk_len}")
  _require(0.0 <= model.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {model.dropout_rate}")

  objective = config.objective
  _one_of(objective.name, OBJECTIVES, "objective.name")
  _one_of(objective.chat_template, CHAT_TEMPLATES, "objective.chat_template")
  families = OBJECTIVE_FAMILIES[objective.name]
  _require(
      model.family in families,
      "model.family",
      f"objective {objective.name} trains {' or '.join(families)} models, not {model.family}",
  )
  if objective.name == "mlm":
    _require(0.0 < objective.mask_rate < 1.0, "objective.mask_rate", f"must be in (0, 1), got {objective.mask_rate}")
  if objective.name == "span_corruption":
    _require(0.0 < objective.noise_density < 1.0, "objective.noise_density", f"must be in (0, 1), got {objective.noise_density}")
    _finite_at_least(objective.mean_span_length, 1.0, "objective.mean_span_length")
  if objective.name in ("mlm", "span_corruption"):
    _require(
        data.source != "synthetic",
        "data.source",
        f"objective {objective.name} needs a tokenizer's special pieces (mask, sentinels), which synthetic data has none of",
    )
  if objective.name == "classification":
    names = [name.strip() for name in objective.class_names.split(",") if name.strip()] if objective.class_names else []
    _require(
        not names or len(names) == objective.num_classes or objective.num_classes == 0,
        "objective.num_classes",
        f"{objective.num_classes} classes but objective.class_names names {len(names)}",
    )
    _require(
        max(objective.num_classes, len(names)) >= 2,
        "objective.num_classes",
        "classification needs at least 2 classes (set objective.num_classes, or objective.class_names)",
    )
  if objective.name in ("sft", "classification"):
    builtin_ok = objective.name == "sft"  # the built-in records are prompt/response pairs
    _require(
        data.source.startswith("text:") or (builtin_ok and data.source == "builtin"),
        "data.source",
        f"objective {objective.name} reads .jsonl records: give text:<dir or glob>{' (or builtin)' if builtin_ok else ''}, "
        f"not {data.source}",
    )
  _require(
      not config.checkpoint.get("init_model") or bool(config.checkpoint.init_from),
      "checkpoint.init_model",
      "takes the model from checkpoint.init_from's run: name that run (--config.checkpoint.init_from=WORKDIR)",
  )

  _require(
      data.source in ("builtin", "synthetic") or data.source.startswith(("text:", "tfds:")),
      "data.source",
      f"unknown source {data.source!r}; choose one of {', '.join(DATA_SOURCES)}",
  )
  _one_of(data.tokenizer_type, TOKENIZER_TYPES, "data.tokenizer_type")
  from lm import objectives  # which imports this module

  reserved = len(objectives.get(config).reserved_pieces())  # the mask, or the sentinels
  _require(
      data.tokenizer_vocab_size >= 260 + reserved,
      "data.tokenizer_vocab_size",
      f"must be >= {260 + reserved} (256 bytes and 4 special pieces{f', and {reserved} reserved by {objective.name}' if reserved else ''})",
  )
  _require(0.0 <= data.validation_fraction < 1.0, "data.validation_fraction", f"must be in [0, 1), got {data.validation_fraction}")
  _require(data.max_document_chars >= 1, "data.max_document_chars", f"must be >= 1, got {data.max_document_chars}")
  _require(data.seq_len >= 1, "data.seq_len", f"must be >= 1, got {data.seq_len}")
  _require(
      data.seq_len <= model.max_seq_len,
      "data.seq_len",
      f"{data.seq_len} is longer than model.max_seq_len={model.max_seq_len}",
  )

  _require(model.num_experts >= 0, "model.num_experts", f"must be >= 0 (0: a dense MLP), got {model.num_experts}")
  if model.num_experts:
    _require(model.family == "llama", "model.num_experts", f"mixtures of experts are built for the llama family, not {model.family}")
    _require(
        1 <= model.experts_per_token <= model.num_experts,
        "model.experts_per_token",
        f"must be between 1 and model.num_experts={model.num_experts}, got {model.experts_per_token}",
    )
    _finite_at_least(model.expert_capacity_factor, 0.0, "model.expert_capacity_factor")
    _finite_at_least(model.router_aux_loss_weight, 0.0, "model.router_aux_loss_weight")

  ici, dcn = mesh_shape(config.mesh, num_devices)
  _require(
      model.num_heads % ici.get("tensor", 1) == 0,
      "model.num_heads",
      f"{model.num_heads} heads cannot be split over mesh.tensor={ici.get('tensor', 1)} devices",
  )
  _require(
      model.num_kv_heads % ici.get("tensor", 1) == 0,
      "model.num_kv_heads",
      f"{model.num_kv_heads} key/value heads cannot be split over mesh.tensor={ici.get('tensor', 1)} devices",
  )
  _require(
      data.seq_len % ici.get("sequence", 1) == 0,
      "data.seq_len",
      f"{data.seq_len} tokens cannot be split over mesh.sequence={ici.get('sequence', 1)} devices",
  )
  if objective.name == "span_corruption":
    decoder_length = objectives.get(config).batch_lengths(data.seq_len)["targets"]
    _require(
        decoder_length % ici.get("sequence", 1) == 0,
        "data.seq_len",
        f"span corruption of {data.seq_len} encoder tokens gives the decoder {decoder_length}, which cannot be split "
        f"over mesh.sequence={ici.get('sequence', 1)} devices; pick another data.seq_len",
    )
  num_stages = ici.get("stage", 1) * dcn.get("stage", 1)
  _require(model.pipeline_microbatches >= 0, "model.pipeline_microbatches", f"must be >= 0 (0: 2 x stages), got {model.pipeline_microbatches}")
  if num_stages > 1:
    _require(model.family in ("llama", "gpt2"), "mesh.stage", f"pipeline stages are built for the decoders (llama, gpt2), not {model.family}")
    _require(model.scan_layers, "mesh.stage", "pipeline stages split the scanned layers: set model.scan_layers=true")
    _require(model.num_layers % num_stages == 0, "mesh.stage", f"{model.num_layers} layers cannot be split into {num_stages} stages")
    _require(not model.num_experts, "mesh.stage", "a mixture of experts is not pipelined yet: use mesh.stage=1")
    _require(model.dropout_rate == 0, "mesh.stage", "pipeline stages run without dropout: set model.dropout_rate=0")
  _require(data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {data.batch_size}")
  data_parallel = math.prod(ici[axis] * dcn[axis] for axis in batch_axes(config.mesh))
  _require(
      data.batch_size % data_parallel == 0,
      "data.batch_size",
      f"{data.batch_size} rows cannot be split over the {data_parallel} data-parallel devices "
      f"({' x '.join(batch_axes(config.mesh))})",
  )
  _require(train.microbatches >= 1, "train.microbatches", f"must be >= 1, got {train.microbatches}")
  if num_stages > 1:
    in_flight = model.pipeline_microbatches or 2 * num_stages
    _require(
        data.batch_size % (train.microbatches * data_parallel * in_flight) == 0,
        "model.pipeline_microbatches",
        f"data.batch_size={data.batch_size} must split into {train.microbatches} x {in_flight} pipeline microbatches "
        f"of a multiple of {data_parallel} rows (the data-parallel devices)",
    )
  _require(
      data.batch_size % (train.microbatches * data_parallel) == 0,
      "train.microbatches",
      f"data.batch_size={data.batch_size} must split into {train.microbatches} microbatches "
      f"of a multiple of {data_parallel} rows (the data-parallel devices)",
  )

  _one_of(opt.schedule, SCHEDULES, "optimizer.schedule")
  _finite_at_least(opt.learning_rate, 0.0, "optimizer.learning_rate")
  _finite_at_least(opt.eps, 0.0, "optimizer.eps", inclusive=False)
  _finite_at_least(opt.weight_decay, 0.0, "optimizer.weight_decay")
  _finite_at_least(opt.grad_clip_norm, 0.0, "optimizer.grad_clip_norm")
  _finite_at_least(train.z_loss_weight, 0.0, "train.z_loss_weight")
  for field in ("b1", "b2"):
    _require(0.0 <= opt[field] < 1.0, f"optimizer.{field}", f"must be in [0, 1), got {opt[field]}")
  _require(
      0.0 <= opt.min_learning_rate_ratio <= 1.0,
      "optimizer.min_learning_rate_ratio",
      f"must be in [0, 1], got {opt.min_learning_rate_ratio}",
  )
  _require(opt.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {opt.warmup_steps}")
  _require(
      opt.warmup_steps <= train.steps,
      "optimizer.warmup_steps",
      f"{opt.warmup_steps} is longer than train.steps={train.steps}",
  )
  _require(0.0 <= opt.decay_fraction <= 1.0, "optimizer.decay_fraction", f"must be in [0, 1], got {opt.decay_fraction}")
  for kind in opt.no_weight_decay:
    _one_of(kind, NO_WEIGHT_DECAY_KINDS, "optimizer.no_weight_decay")
  _require(train.steps >= 1, "train.steps", f"must be >= 1, got {train.steps}")
  _require(train.log_every >= 1, "train.log_every", f"must be >= 1, got {train.log_every}")
  _require(train.profile_steps >= 0, "train.profile_steps", f"must be >= 0 (0: no profile), got {train.profile_steps}")
  _require(train.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {train.max_bad_steps}")

  _require(config.eval.every >= 0, "eval.every", f"must be >= 0 (0: never), got {config.eval.every}")
  _require(config.eval.steps >= 0, "eval.steps", f"must be >= 0 (0: the whole split), got {config.eval.steps}")

  checkpoint = config.checkpoint
  _require(checkpoint.every >= 0, "checkpoint.every", f"must be >= 0 (0: only at the end), got {checkpoint.every}")
  _require(checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {checkpoint.keep}")
  _require(checkpoint.keep_period >= 0, "checkpoint.keep_period", f"must be >= 0, got {checkpoint.keep_period}")
  if checkpoint.init_from:
    _require(
        os.path.isdir(absolute_path(checkpoint.init_from)),
        "checkpoint.init_from",
        f"{checkpoint.init_from} is not a directory (give another run's workdir or checkpoints directory)",
    )
