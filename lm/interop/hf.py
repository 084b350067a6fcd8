"""Hugging Face checkpoints: lm params <-> `LlamaForCausalLM` / `MixtralForCausalLM` / `GPT2LMHeadModel` /
`BertForMaskedLM` / `T5ForConditionalGeneration` safetensors.

    model_config, params = hf.load("path/to/hf_dir")   # params as lm.models.get(model_config) takes them
    hf.save(model_config, params, "path/to/out_dir", tokenizer_path="tokenizer.model")  # or a tokenizer.json

Neither direction needs torch or transformers: weights go through safetensors' numpy API and the
configs are plain JSON. lm's rotary embedding already uses Hugging Face's half-split layout and
its head order, so attention weights are reshaped and transposed, never permuted.

Llama's and GPT-2's tables are here; BERT's and T5's in lm/interop/bert.py and t5.py, which the
functions below hand those families to. Mixtral is a llama-family model with model.num_experts > 0:
its attention and norms are Llama's, its MLP lm's MoeMlp (lm/models/moe.py).

Shape letters: D embed dim, N query heads, K key/value heads, H head dim, F MLP width, V vocab,
E experts.
"""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import safetensors.numpy

from lm.config import ConfigError, DEFAULT_CONFIG_FILE, load_config_file
from lm.data import tokenizer as tokenizer_lib
from lm.interop import bert, mixtral, t5, tables
from lm.models import transformer
from lm.objectives import span_corruption

MAX_SHARD_BYTES = 5 * 2**30  # larger checkpoints are split into model-0000i-of-0000n.safetensors
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Per layer: (Hugging Face name, path under the lm layer, Linear weight whose [out, in] is the
# transpose of lm's [in, out] kernel).
# Mixtral's layers share the attention and norms; their MLP is a mixture of experts (_experts_to_hf).
LLAMA_ATTENTION = (
    ("input_layernorm.weight", ("attn_norm", "scale"), False),
    ("self_attn.q_proj.weight", ("attn", "query", "kernel"), True),
    ("self_attn.k_proj.weight", ("attn", "key", "kernel"), True),
    ("self_attn.v_proj.weight", ("attn", "value", "kernel"), True),
    ("self_attn.o_proj.weight", ("attn", "out", "kernel"), True),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), False),
)
LLAMA_LAYER = LLAMA_ATTENTION + (
    ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down", "kernel"), True),
)
# GPT-2's Conv1D weights are stored [in, out], as lm's kernels are; q, k and v are fused (c_attn).
GPT2_LAYER = (
    ("ln_1.weight", ("attn_norm", "scale"), False),
    ("ln_1.bias", ("attn_norm", "bias"), False),
    ("attn.c_proj.weight", ("attn", "out", "kernel"), False),
    ("attn.c_proj.bias", ("attn", "out", "bias"), False),
    ("ln_2.weight", ("mlp_norm", "scale"), False),
    ("ln_2.bias", ("mlp_norm", "bias"), False),
    ("mlp.c_fc.weight", ("mlp", "up", "kernel"), False),
    ("mlp.c_fc.bias", ("mlp", "up", "bias"), False),
    ("mlp.c_proj.weight", ("mlp", "down", "kernel"), False),
    ("mlp.c_proj.bias", ("mlp", "down", "bias"), False),
)
GPT2_QKV = (("attn", "query"), ("attn", "key"), ("attn", "value"))
# The families whose tables live in their own modules.
FAMILY_TABLES = {"bert": bert, "t5": t5}


# ---------------------------------------------------------------------------------------------
# lm -> Hugging Face


def to_hf_tensors(model: ml_collections.ConfigDict, params: dict) -> dict[str, np.ndarray]:
  """lm params (scanned or not) -> Hugging Face state dict of numpy arrays."""
  params = jax.tree.map(np.asarray, jax.device_get(params))
  if model.family in FAMILY_TABLES:
    return FAMILY_TABLES[model.family].to_hf_tensors(model, params)

  def layer(i: int) -> dict:
    return jax.tree.map(lambda x: x[i], params["layers"]) if "layers" in params else params[f"layers_{i}"]

  def convert(path, value, transpose):
    if path[-1] == "kernel":
      return tables.kernel_to_hf(value, tables.contracted_dims(path), transpose)
    return value.reshape(-1)

  tensors = {}
  if model.family == "llama":
    moe = model.get("num_experts", 0) > 0  # configs saved before mixtures of experts existed lack it
    tensors["model.embed_tokens.weight"] = params["token_embed"]["embedding"]
    for i in range(model.num_layers):
      for name, path, transpose in LLAMA_ATTENTION if moe else LLAMA_LAYER:
        tensors[f"model.layers.{i}.{name}"] = convert(path, tables.get(layer(i), path), transpose)
      if moe:
        for name, value in mixtral.experts_to_hf(layer(i)["mlp"]).items():
          tensors[f"model.layers.{i}.{mixtral.MOE_PREFIX}{name}"] = value
    tensors["model.norm.weight"] = params["final_norm"]["scale"]
  else:
    if model.num_kv_heads != model.num_heads:
      raise ConfigError("model.num_kv_heads: GPT2LMHeadModel has no grouped-query attention; it must equal model.num_heads")
    tensors["transformer.wte.weight"] = params["token_embed"]["embedding"]
    tensors["transformer.wpe.weight"] = params["position_embed"]["embedding"]
    for i in range(model.num_layers):
      prefix = f"transformer.h.{i}."
      for name, path, transpose in GPT2_LAYER:
        tensors[prefix + name] = convert(path, tables.get(layer(i), path), transpose)
      qkv = [tables.get(layer(i), path) for path in GPT2_QKV]
      tensors[prefix + "attn.c_attn.weight"] = np.concatenate([tables.kernel_to_hf(p["kernel"], 1, False) for p in qkv], axis=1)
      tensors[prefix + "attn.c_attn.bias"] = np.concatenate([p["bias"].reshape(-1) for p in qkv])
    tensors["transformer.ln_f.weight"] = params["final_norm"]["scale"]
    tensors["transformer.ln_f.bias"] = params["final_norm"]["bias"]
  if not model.tie_embeddings:
    tensors["lm_head.weight"] = params["lm_head"]["kernel"].T
  return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def _rope_scaling_to_hf(model: ml_collections.ConfigDict) -> dict | None:
  """transformers' rope_scaling for model.rope_scaling; None for none."""
  scaling = model.get("rope_scaling", "none")  # configs saved before it existed lack it
  if scaling == "linear":
    return {"rope_type": "linear", "factor": model.rope_scaling_factor}
  if scaling == "llama3":
    return {
        "rope_type": "llama3", "factor": model.rope_scaling_factor, "low_freq_factor": model.rope_low_freq_factor,
        "high_freq_factor": model.rope_high_freq_factor,
        "original_max_position_embeddings": model.rope_original_max_seq_len,
    }  # fmt: skip
  return None


def hf_config(model: ml_collections.ConfigDict, eos_id: int, bos_id: int | None = None, decoder_start_id: int | None = None) -> dict:
  """config.json for transformers. lm's documents start after an EOS, so EOS is also the BOS unless `bos_id` is given;
  T5's decoder starts from `decoder_start_id` (default the BOS)."""
  bos_id = eos_id if bos_id is None else bos_id
  common = {"vocab_size": model.vocab_size, "tie_word_embeddings": model.tie_embeddings, "bos_token_id": bos_id,
            "eos_token_id": eos_id, "torch_dtype": model.param_dtype}  # fmt: skip
  if model.family == "t5":
    return t5.hf_config(model, common, bos_id if decoder_start_id is None else decoder_start_id)
  if model.family == "bert":
    return bert.hf_config(model, common)
  if model.family == "llama":
    scaling = _rope_scaling_to_hf(model)
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": model.rope_theta}
    shared = {
        **common, "hidden_size": model.embed_dim, "intermediate_size": model.mlp_dim,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads, "head_dim": model.embed_dim // model.num_heads,
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps, "hidden_act": "silu",
        # transformers < 5 reads rope_theta and rope_scaling, 5 and later rope_parameters.
        "rope_theta": model.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,
    }  # fmt: skip
    if model.get("num_experts", 0):
      return mixtral.hf_config(model, shared)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **shared, "attention_bias": False,
        "mlp_bias": False,
    }  # fmt: skip
  return {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
      "n_embd": model.embed_dim, "n_inner": model.mlp_dim, "n_layer": model.num_layers, "n_head": model.num_heads,
      "n_positions": model.max_seq_len, "layer_norm_epsilon": model.norm_eps, "activation_function": "gelu_new",
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
  }  # fmt: skip


def _write_tokenizer(tokenizer: tokenizer_lib.Tokenizer, out_dir: str, max_length: int) -> None:
  """A sentencepiece model wrapped as a LlamaTokenizer that (like lm) starts every text with EOS; a tokenizer.json
  as it is (its own BOS handling), as a PreTrainedTokenizerFast."""
  if isinstance(tokenizer, tokenizer_lib.HfTokenizer):
    tokenizer.copy_to(out_dir)  # with a tokenizer_config.json naming its BOS and EOS
    with open(os.path.join(out_dir, tokenizer_lib.HF_CONFIG_FILE)) as f:
      config = json.load(f)
    special = {key: config[key] for key in ("bos_token", "eos_token") if config[key] is not None}
    # decode() must not drop the spaces before punctuation that lm's decode keeps.
    config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False, model_max_length=max_length)
  else:
    shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.model"))
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
        "add_prefix_space": False, "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": max_length,
    }  # fmt: skip
  for name, content in ((tokenizer_lib.HF_CONFIG_FILE, config), ("special_tokens_map.json", special)):
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(content, f, indent=2)


def save(
    model: ml_collections.ConfigDict,
    params: dict,
    out_dir: str,
    tokenizer_path: str | None = None,
    eos_id: int = 2,
    tokenizer_vocab_size: int | None = None,
) -> None:
  """Writes a directory that transformers' from_pretrained loads: config, safetensors weights, tokenizer.

  `tokenizer_path`: a sentencepiece model or a tokenizer.json (whose own BOS, if any, becomes the model's).
  Embedding rows past `tokenizer_vocab_size` (lm pads the vocabulary) are suppressed in generation.
  """
  tokenizer = tokenizer_lib.load(tokenizer_path) if tokenizer_path else None
  bos_id = tokenizer.bos_id if isinstance(tokenizer, tokenizer_lib.HfTokenizer) and tokenizer.bos_id >= 0 else eos_id
  os.makedirs(out_dir, exist_ok=True)
  tensors = to_hf_tensors(model, params)
  shards, shard, shard_bytes = [], {}, 0
  for name, tensor in tensors.items():
    if shard and shard_bytes + tensor.nbytes > MAX_SHARD_BYTES:
      shards.append(shard)
      shard, shard_bytes = {}, 0
    shard[name] = tensor
    shard_bytes += tensor.nbytes
  shards.append(shard)
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for index, shard in enumerate(shards, 1):
      file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
      safetensors.numpy.save_file(shard, os.path.join(out_dir, file_name), metadata={"format": "pt"})
      weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
      json.dump(index, f, indent=2)
  # T5's decoder starts from the token lm's span corruption puts there.
  decoder_start_id = span_corruption.decoder_start_id(tokenizer) if tokenizer and model.family == "t5" else bos_id
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config(model, eos_id, bos_id, decoder_start_id), f, indent=2)
  generation = {"bos_token_id": bos_id, "eos_token_id": eos_id}
  if model.family == "t5":
    generation["decoder_start_token_id"] = decoder_start_id
  if tokenizer_vocab_size and tokenizer_vocab_size < model.vocab_size:
    generation["suppress_tokens"] = list(range(tokenizer_vocab_size, model.vocab_size))
  if model.family != "bert":  # a masked LM does not generate
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2)
  if tokenizer:
    _write_tokenizer(tokenizer, out_dir, model.max_seq_len)


# ---------------------------------------------------------------------------------------------
# Hugging Face -> lm


def _unsupported(feature: str) -> ConfigError:
  return ConfigError(f"config.json: {feature} is not supported by lm's Transformer")


def _rope_field(rope: dict, rope_type: str, name: str):
  if rope.get(name) is None:
    raise ConfigError(f"config.json: rope_scaling {rope_type} lacks {name}")
  return rope[name]


def model_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """lm's `model` config section for a transformers config.json (as a dict)."""
  model = load_config_file(DEFAULT_CONFIG_FILE).model
  model_type = hf.get("model_type")
  if model_type in mixtral.UNSUPPORTED_MOE:
    raise _unsupported(f"model_type {model_type!r} ({mixtral.UNSUPPORTED_MOE[model_type]})")
  if model_type in ("llama", "mixtral"):
    # transformers < 5 writes rope_theta and rope_scaling ("type" before 4.45), 5 and later rope_parameters;
    # given both, each reads rope_scaling.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    default_theta = 1e6 if model_type == "mixtral" else 10000.0  # transformers' defaults
    rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", default_theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
      raise _unsupported(f"rope_scaling type {rope_type!r} (lm reads linear and llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise _unsupported(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise _unsupported(f"{flag}=true")
    if hf.get("hidden_act", "silu") != "silu":
      raise _unsupported(f"hidden_act={hf['hidden_act']!r}")
    num_heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // num_heads):
      raise _unsupported(f"head_dim={hf['head_dim']} (other than hidden_size / num_attention_heads)")
    model.update(
        family="llama", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], embed_dim=hf["hidden_size"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads, mlp_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(rope_theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
    )  # fmt: skip
    if rope_type != "default":
      model.rope_scaling = rope_type
      model.rope_scaling_factor = float(_rope_field(rope, rope_type, "factor"))
    if rope_type == "llama3":
      model.rope_low_freq_factor = float(_rope_field(rope, rope_type, "low_freq_factor"))
      model.rope_high_freq_factor = float(_rope_field(rope, rope_type, "high_freq_factor"))
      # transformers falls back on max_position_embeddings, as here.
      model.rope_original_max_seq_len = int(rope.get("original_max_position_embeddings") or model.max_seq_len)
    if model_type == "mixtral":
      mixtral.model_config(hf, model)
  elif model_type in FAMILY_TABLES:
    model = FAMILY_TABLES[model_type].model_config_from_hf(hf, model)
  elif model_type == "gpt2":
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
      raise _unsupported(f"activation_function={hf['activation_function']!r}")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
      raise _unsupported("attention scaling other than 1/sqrt(head_dim)")
    model.update(
        family="gpt2", vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], embed_dim=hf["n_embd"],
        num_heads=hf["n_head"], num_kv_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"],
        max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )  # fmt: skip
  else:
    raise _unsupported(f"model_type {model_type!r} (lm reads llama, mixtral, gpt2, bert and t5)")
  model.vocab_multiple = 1  # the checkpoint's vocabulary size is kept as it is
  return model


def _read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"no model.safetensors in {hf_dir} (save it with safe_serialization=True)")
  tensors = {}
  for name in files:
    tensors.update(safetensors.numpy.load_file(os.path.join(hf_dir, name)))
  return tensors


def from_hf_tensors(model: ml_collections.ConfigDict, tensors: dict[str, np.ndarray]) -> dict:
  """Hugging Face state dict -> lm params, scanned if model.scan_layers."""
  if model.family in FAMILY_TABLES:
    return FAMILY_TABLES[model.family].from_hf_tensors(model, tensors)
  shapes = transformer.parameter_shapes(model, scan_layers=False)
  params: dict = {}

  def tensor(name: str) -> np.ndarray:
    return tables.required(tensors, name)

  def place(value: np.ndarray, path: tuple[str, ...], name: str) -> None:
    shape = tables.get(shapes, path)
    if value.size != np.prod(shape):
      raise ConfigError(f"weights: {name} has shape {value.shape}, which does not fit {'/'.join(path)} of shape {shape}")
    tables.put(params, path, value.reshape(shape).astype(np.float32))

  def take(name: str, path: tuple[str, ...], transpose: bool = False) -> None:
    place(tensor(name).T if transpose else tensor(name), path, name)

  if model.family == "llama":
    moe = model.get("num_experts", 0) > 0
    take("model.embed_tokens.weight", ("token_embed", "embedding"))
    for i in range(model.num_layers):
      for name, path, transpose in LLAMA_ATTENTION if moe else LLAMA_LAYER:
        take(f"model.layers.{i}.{name}", (f"layers_{i}", *path), transpose)
      if moe:
        for key, (value, name) in mixtral.experts_from_hf(tensors, f"model.layers.{i}.", model.num_experts).items():
          shape = tables.get(shapes, (f"layers_{i}", "mlp", key))
          if value.shape != shape:  # a reshape would silently mix the expert and feature axes
            raise ConfigError(f"weights: {name} gives mlp/{key} of shape {value.shape}; layer {i} needs {shape}")
          tables.put(params, (f"layers_{i}", "mlp", key), value.astype(np.float32))
    take("model.norm.weight", ("final_norm", "scale"))
  else:
    if "transformer.wte.weight" not in tensors and "wte.weight" in tensors:
      # OpenAI's GPT-2 checkpoints on the Hub were saved from GPT2Model: their names lack the prefix.
      tensors = {name if name.startswith("lm_head.") else "transformer." + name: value for name, value in tensors.items()}
    take("transformer.wte.weight", ("token_embed", "embedding"))
    take("transformer.wpe.weight", ("position_embed", "embedding"))
    for i in range(model.num_layers):
      prefix = f"transformer.h.{i}."
      for name, path, transpose in GPT2_LAYER:
        take(prefix + name, (f"layers_{i}", *path), transpose)
      fused = prefix + "attn.c_attn"
      weights = np.split(tensor(fused + ".weight"), 3, axis=1)
      biases = np.split(tensor(fused + ".bias"), 3)
      for path, weight, bias in zip(GPT2_QKV, weights, biases):
        place(weight, (f"layers_{i}", *path, "kernel"), fused + ".weight")
        place(bias, (f"layers_{i}", *path, "bias"), fused + ".bias")
    take("transformer.ln_f.weight", ("final_norm", "scale"))
    take("transformer.ln_f.bias", ("final_norm", "bias"))
  if not model.tie_embeddings:
    take("lm_head.weight", ("lm_head", "kernel"), transpose=True)
  return transformer.stack_layers(params, model.num_layers) if model.scan_layers else params


def load(hf_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(lm model config, lm params as numpy arrays) of a transformers checkpoint directory."""
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no config.json in {hf_dir}")
  with open(config_path) as f:
    model = model_config_from_hf(json.load(f))
  return model, from_hf_tensors(model, _read_tensors(hf_dir))
