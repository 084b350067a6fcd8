"""Hugging Face interop: logits equal transformers', export(import(x)) == x, the same greedy text."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm  # noqa: E402
from lm.config import ConfigError  # noqa: E402
from lm.interop import hf  # noqa: E402
from lm.models import Transformer, transformer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 20))

HF_MODELS = {
    "llama_gqa_untied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama_mha_tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=True)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
}  # fmt: skip


def _hf_model(name: str):
  torch.manual_seed(0)
  model = HF_MODELS[name]().eval()
  with torch.no_grad():  # norms at 1 and biases at 0 would hide a mix-up of those tensors
    for parameter_name, parameter in model.named_parameters():
      if "norm" in parameter_name or "ln_" in parameter_name or "bias" in parameter_name:
        parameter.add_(torch.randn_like(parameter) * 0.1)
  return model


def _hf_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _lm_logits(model_config, params, tokens: np.ndarray = TOKENS) -> np.ndarray:
  model_config = ml_collections.ConfigDict(model_config)
  model_config.dtype = "float32"
  model = Transformer(ml_collections.FrozenConfigDict(model_config))
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(jax.jit(model.apply)({"params": params}, tokens, np.ones_like(tokens), positions))


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_imported_transformers_model_gives_its_logits(name, tmp_path):
  model = _hf_model(name)
  model.save_pretrained(tmp_path)
  model_config, params = hf.load(str(tmp_path))
  np.testing.assert_allclose(_lm_logits(model_config, params), _hf_logits(model), atol=1e-4)


def test_gpt2_weights_named_without_the_transformer_prefix_import(tmp_path):
  """The Hub's openai-community/gpt2 files name tensors wte.weight, h.0.attn.c_attn.weight, ..., with the
  causal-mask buffers attn.bias among them."""
  model = _hf_model("gpt2")
  model.save_pretrained(tmp_path)
  tensors = hf._read_tensors(str(tmp_path))
  bare = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items() if name != "lm_head.weight"}
  bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  os.remove(tmp_path / "model.safetensors")
  safetensors_numpy.save_file(bare, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  model_config, params = hf.load(str(tmp_path))
  np.testing.assert_allclose(_lm_logits(model_config, params), _hf_logits(model), atol=1e-4)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_export_of_import_reproduces_every_tensor(name, tmp_path):
  _hf_model(name).save_pretrained(tmp_path / "original")
  model_config, params = hf.load(str(tmp_path / "original"))
  hf.save(model_config, params, str(tmp_path / "again"))
  original = hf._read_tensors(str(tmp_path / "original"))
  again = hf._read_tensors(str(tmp_path / "again"))
  assert set(again) <= set(original)
  for tensor_name, tensor in again.items():
    np.testing.assert_array_equal(tensor, original[tensor_name], err_msg=tensor_name)


@pytest.mark.parametrize(
    "family, overrides",
    [("llama", {"model.tie_embeddings": False}), ("llama", {"model.num_kv_heads": 4}), ("gpt2", {"model.num_kv_heads": 4})],
)
def test_exported_lm_model_gives_lm_logits_in_transformers(tiny_config, family, overrides, tmp_path):
  config = tiny_config(family, overrides)
  config.model.vocab_size = 96
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  positions = np.zeros_like(TOKENS)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(3), TOKENS, TOKENS, positions)["params"])
  # Norms at 1 and biases at 0 would hide a mix-up of those tensors.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), params)
  hf.save(config.model, params, str(tmp_path))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  np.testing.assert_allclose(_hf_logits(exported), _lm_logits(config.model, params), atol=1e-4)


def test_scanned_and_unscanned_params_export_alike(tmp_path):
  _hf_model("llama_gqa_untied").save_pretrained(tmp_path)
  model_config, scanned = hf.load(str(tmp_path))
  unscanned_config = ml_collections.ConfigDict(model_config)
  unscanned_config.scan_layers = False
  unscanned = hf.from_hf_tensors(unscanned_config, hf._read_tensors(str(tmp_path)))
  assert "layers" in scanned and "layers_0" in unscanned
  a, b = hf.to_hf_tensors(model_config, scanned), hf.to_hf_tensors(unscanned_config, unscanned)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_scaling type 'dynamic'"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling type 'longrope'"),  # transformers < 4.45
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling llama3 lacks low_freq_factor"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
    ],
)
def test_unsupported_options_are_named(change, named, tmp_path):
  _hf_model("llama_gqa_untied").save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config.update(change)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=named):
    hf.load(str(tmp_path))


# Llama 3.1's rope scaling, and linear, on a context 2x what the model was "pretrained" on.
ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
}  # fmt: skip
LONG_TOKENS = np.random.default_rng(1).integers(0, 96, (2, 64))


def _rope_scaled_llama(rope_type: str, vocab_size: int = 96):
  """A Llama with grouped-query attention, an untied head and rope scaling, its weights large enough that attention
  is far from uniform (with transformers' 0.02 every position would look alike and no rotation would matter)."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rope_scaling=ROPE_SCALINGS[rope_type],
      rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
  )  # fmt: skip
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "norm" in name:
        parameter.add_(torch.randn_like(parameter) * 0.1)
  return model


@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALINGS))
def test_rope_scaled_llama_gives_its_logits_beyond_the_original_context_both_ways(rope_type, tmp_path):
  model = _rope_scaled_llama(rope_type)
  model.save_pretrained(tmp_path / "original")
  model_config, params = hf.load(str(tmp_path / "original"))
  assert (model_config.rope_scaling, model_config.rope_scaling_factor) == (rope_type, 4.0)
  expected = _hf_logits(model, LONG_TOKENS)
  np.testing.assert_allclose(_lm_logits(model_config, params, LONG_TOKENS), expected, atol=1e-4)
  unscaled = ml_collections.ConfigDict(model_config)
  unscaled.rope_scaling = "none"
  assert np.abs(_lm_logits(unscaled, params, LONG_TOKENS) - expected).max() > 1e-2  # so the check above can fail

  hf.save(model_config, params, str(tmp_path / "exported"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
  assert exported.config.rope_parameters == {**ROPE_SCALINGS[rope_type], "rope_theta": 500.0}
  np.testing.assert_allclose(_hf_logits(exported, LONG_TOKENS), expected, atol=1e-4)


def test_a_llama3_checkpoint_with_a_tokenizer_json_imports_trains_and_exports(corpus_dir, tmp_path):
  """Llama 3's shape (rope scaling, grouped-query attention, untied head, a byte-level BPE tokenizer.json with a
  tokenizer_config.json): import, the same logits, a few training steps on text, export, transformers reads it."""
  from conftest import train_byte_level_bpe
  from lm import workdir as workdir_lib
  from lm.config import load_config_file
  from lm.data import examples, tokenizer as tokenizer_lib
  from lm.objectives import sft
  from lm.train import loop

  interop = _import_export()
  hf_dir, workdir, out = tmp_path / "llama3", tmp_path / "run", tmp_path / "exported"
  hf_dir.mkdir()
  documents = [path.read_text() for path in sorted(corpus_dir.rglob("doc*"))]
  tokenizer = tokenizer_lib.load(train_byte_level_bpe(hf_dir, documents, vocab_size=320))
  original = _rope_scaled_llama("llama3", vocab_size=tokenizer.vocab_size)
  original.save_pretrained(hf_dir)
  tokens = np.asarray([[tokenizer.bos_id] + tokenizer.encode(document)[:63] for document in documents[:2]])

  interop.import_checkpoint(str(hf_dir), str(workdir), None)
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(workdir))
  assert not (workdir / "tokenizer.model").exists()
  imported = lm.load(str(workdir))
  assert type(imported.tokenizer) is tokenizer_lib.HfTokenizer
  assert imported.tokenizer.fingerprint == tokenizer.fingerprint
  imported_logits = _lm_logits(imported.config.model, imported.params, tokens)
  np.testing.assert_allclose(imported_logits, _hf_logits(original, tokens), atol=1e-4)

  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))  # as configs/from_run.py does
  config.update_from_flattened_dict({
      "data.source": f"text:{corpus_dir}", "data.data_dir": str(tmp_path / "data"), "data.seq_len": 64,
      "data.batch_size": 8, "train.steps": 2, "train.log_every": 1, "optimizer.warmup_steps": 1,
      "optimizer.learning_rate": 1e-2, "eval.every": 0, "model.dtype": "float32", "model.loss_chunk_len": 0,
  })  # fmt: skip
  loop.train(config, str(workdir))  # tokenizes the text with the kept tokenizer.json, resumes from step 0
  assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == [1, 2]
  assert lm.load(str(workdir)).config.model.rope_scaling == "llama3"

  # Fine-tuned as configs/sft.py does: chats in Llama 3's template, the model and tokenizer from the run.
  chats, tuned_dir = tmp_path / "chats", tmp_path / "sft"
  chats.mkdir()
  with open(chats / "chats.jsonl", "w") as f:
    for index in range(40):
      turns = [("user", documents[index % 20][:60]), ("assistant", documents[(index + 7) % 20][:60])]
      f.write(json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]}) + "\n")
  sft_config = load_config_file(os.path.join(REPO, "configs", "sft.py"))
  sft_config.update_from_flattened_dict({
      "data.source": f"text:{chats}", "data.data_dir": str(tmp_path / "data"), "data.seq_len": 64, "data.batch_size": 8,
      "train.steps": 2, "optimizer.warmup_steps": 1, "eval.every": 0, "checkpoint.init_from": str(workdir), "model.dtype": "float32",
      "model.loss_chunk_len": 0,
  })  # fmt: skip
  loop.train(sft_config, str(tuned_dir))
  trained = lm.load(str(tuned_dir))
  assert trained.step == 2 and trained.config.model.rope_scaling == "llama3" and trained.objective.name == "sft"
  assert sft.template_name("auto", trained.tokenizer) == "llama3"
  (row,) = examples.PackedRows(workdir_lib.recorded_dataset(str(tuned_dir)), "train", 64, None, 32).row(0)[:1]
  assert row.inputs[0] == tokenizer.token_id("<|begin_of_text|>") and row.inputs[1] == tokenizer.token_id("<|start_header_id|>")

  interop.export(str(tuned_dir), None, str(out))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert exported.config.rope_parameters["rope_type"] == "llama3"
  ours = _lm_logits(trained.config.model, trained.params, tokens)
  assert np.abs(ours - imported_logits).max() > 1e-3  # it did train
  np.testing.assert_allclose(_hf_logits(exported, tokens), ours, atol=1e-4)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)
  for text in [documents[2], "  code:\n\tx = ñ 😀 ", "the model = 7"]:
    assert hf_tokenizer(text)["input_ids"] == [tokenizer.bos_id] + tokenizer.encode(text)  # Llama 3's post-processor
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text


def test_gpt2_export_refuses_grouped_query_attention(tiny_config, tmp_path):
  config = tiny_config("gpt2")  # num_kv_heads=2 < num_heads=4
  params = transformer.parameter_shapes(config.model, scan_layers=True)
  with pytest.raises(ConfigError, match="model.num_kv_heads"):
    hf.save(config.model, jax.tree.map(np.zeros, params, is_leaf=lambda x: isinstance(x, tuple)), str(tmp_path))


def test_trained_run_exports_and_generates_the_same_greedy_text(trained_run, tmp_path):
  _, workdir = trained_run
  result = subprocess.run([sys.executable, "-m", "lm.interop", "export", f"--workdir={workdir}", f"--out={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
  assert result.returncode == 0, result.stderr
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  run = lm.load(workdir)
  for prompt in ["the model", "# document 3\nloss", "= 7"]:
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == [run.tokenizer.eos_id] + run.tokenizer.encode(prompt)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    hf_text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert hf_text == run.generate([prompt], max_new_tokens=12, temperature=0.0)[0]


def test_imported_model_evaluates_and_continues_training(trained_run, corpus_dir, tmp_path):
  _, workdir = trained_run
  exported, imported = tmp_path / "hf", tmp_path / "imported"
  for command in (["export", f"--workdir={workdir}", f"--out={exported}"], ["import", str(exported), f"--workdir={imported}"]):
    result = subprocess.run([sys.executable, "-m", "lm.interop", *command], cwd=REPO, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr
  original, again = lm.load(workdir), lm.load(str(imported))
  assert again.step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params), jax.device_get(original.params))
  text = ["the model reads every token = 12\n"]
  # The import takes configs/default.py's bfloat16 compute; the original ran in float32.
  assert again.loss(text)["loss"] == pytest.approx(original.loss(text)["loss"], rel=1e-2)

  trained = subprocess.run(
      [sys.executable, "-m", "lm.train", f"--config=configs/from_run.py:{imported}", f"--workdir={imported}",
       "--config.train.steps=3", f"--config.data.source=text:{corpus_dir}", "--config.data.seq_len=32",
       "--config.data.batch_size=8", "--config.optimizer.warmup_steps=1", "--config.train.log_every=1",
       "--config.eval.every=0", f"--config.data.data_dir={tmp_path / 'data'}"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert trained.returncode == 0, trained.stderr
  assert "Resuming from step 0" in trained.stdout
  rows = [json.loads(line) for line in open(imported / "metrics.jsonl")]
  assert [row["step"] for row in rows] == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in rows)


def _import_export():
  from lm.interop import __main__ as interop

  return interop


def _tree_bytes(folder) -> dict[str, bytes]:
  """Every file under `folder` and its content."""
  return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_import_and_export_never_write_over_a_run_or_a_model(trained_run, tmp_path):
  """Into a run, into the Hugging Face folder itself, export onto the run: refused, nothing changed."""
  import shutil

  from lm.config import UserError

  interop = _import_export()
  run = tmp_path / "run"
  shutil.copytree(trained_run[1], run)
  hf_dir = tmp_path / "hf"
  interop.export(str(run), None, str(hf_dir))
  link = tmp_path / "link_to_hf"
  link.symlink_to(hf_dir, target_is_directory=True)
  before = {"run": _tree_bytes(run), "hf": _tree_bytes(hf_dir)}
  refusals = [
      (lambda: interop.import_checkpoint(str(hf_dir), str(run), None), "is not empty; pass --overwrite"),
      (lambda: interop.import_checkpoint(str(hf_dir), str(hf_dir), None, overwrite=True), "would write over the Hugging Face folder"),
      (lambda: interop.import_checkpoint(str(hf_dir), str(hf_dir / "inside"), None, overwrite=True), "would write over"),
      (lambda: interop.export(str(run), None, str(run), overwrite=True), "would write over the run"),
      (lambda: interop.export(str(run), None, str(run / "checkpoints"), overwrite=True), "would write over the run"),
      (lambda: interop.export(str(run), None, str(hf_dir)), "is not empty; pass --overwrite"),
      (lambda: interop.import_checkpoint(str(hf_dir), str(link), None, overwrite=True), "would write over the Hugging Face"),
  ]
  for call, message in refusals:
    with pytest.raises(UserError, match=message):
      call()
  assert {"run": _tree_bytes(run), "hf": _tree_bytes(hf_dir)} == before

  interop.export(str(run), None, str(hf_dir), overwrite=True)  # replaced, the same files again
  assert set(_tree_bytes(hf_dir)) == set(before["hf"])
  interop.import_checkpoint(str(hf_dir), str(run), None, overwrite=True)  # the run replaced by a step-0 import
  assert lm.load(str(run)).steps() == [0] and not (run / "metrics.jsonl").exists()


def test_import_into_a_workdir_in_use_names_the_process(trained_run, tmp_path):
  from lm import workdir as workdir_lib

  hf_dir, busy = tmp_path / "hf", tmp_path / "busy"
  _import_export().export(trained_run[1], None, str(hf_dir))
  with workdir_lib.Lock(str(busy), "training"):
    result = subprocess.run([sys.executable, "-m", "lm.interop", "import", str(hf_dir), f"--workdir={busy}", "--overwrite"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
  assert result.returncode == 1
  (line,) = result.stderr.strip().splitlines()
  assert f"is in use: training process {os.getpid()}" in line
