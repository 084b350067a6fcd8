"""Hugging Face interop of the encoder (BERT) and the encoder-decoder (T5 v1.1): logits equal transformers' on
padded inputs, export(import(x)) == x tensor for tensor, exported lm models give lm's logits in transformers."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm  # noqa: E402
from lm import models  # noqa: E402
from lm.config import ConfigError  # noqa: E402
from lm.interop import hf, tables  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 99
RNG = np.random.default_rng(0)
ENCODER_TOKENS = RNG.integers(0, VOCAB, (2, 20))
DECODER_TOKENS = RNG.integers(0, VOCAB, (2, 12))
# 1 for real tokens, 0 for padding (lm's segment ids; transformers' attention_mask): row 1 ends in 6 pads.
ENCODER_MASK = np.ones_like(ENCODER_TOKENS)
ENCODER_MASK[1, -6:] = 0


def _t5_config(**fields):
  common = dict(vocab_size=VOCAB, d_model=32, d_ff=37, num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
  return transformers.T5Config(**{**common, **fields})


HF_MODELS = {
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=3, layer_norm_eps=1e-12)),
    # T5 v1.1: an untied output layer, logits unscaled.
    "t5_v1_1": lambda: transformers.T5ForConditionalGeneration(_t5_config(d_kv=8, num_layers=2, tie_word_embeddings=False)),
    # Heads wider than d_model / num_heads, fewer decoder blocks, distances past relative_attention_max_distance,
    # and the original T5's tied output layer (logits scaled by d_model ** -0.5).
    "t5_tied_wide_heads": lambda: transformers.T5ForConditionalGeneration(_t5_config(
        d_kv=16, num_layers=3, num_decoder_layers=2, relative_attention_num_buckets=16,
        relative_attention_max_distance=12, layer_norm_epsilon=1e-5, tie_word_embeddings=True)),
}  # fmt: skip


def _hf_model(name: str):
  torch.manual_seed(0)
  model = HF_MODELS[name]()
  with torch.no_grad():  # norms at 1 and biases at 0 would hide a mix-up of those tensors
    for parameter_name, parameter in model.named_parameters():
      if "norm" in parameter_name.lower() or "bias" in parameter_name:
        parameter.add_(torch.randn_like(parameter) * 0.1)
    if name == "t5_v1_1":  # transformers 5 ties lm_head to the embedding unless they differ
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
  return model.eval()


def _hf_logits(model, family: str) -> np.ndarray:
  mask = torch.tensor(ENCODER_MASK)
  with torch.no_grad():
    if family == "bert":
      return model(torch.tensor(ENCODER_TOKENS), attention_mask=mask).logits.numpy()
    inputs = dict(attention_mask=mask, decoder_input_ids=torch.tensor(DECODER_TOKENS))
    return model(torch.tensor(ENCODER_TOKENS), **inputs).logits.numpy()


def _positions(tokens: np.ndarray) -> np.ndarray:
  return np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)


def _lm_logits(model_config, params) -> np.ndarray:
  model_config = ml_collections.ConfigDict(model_config)
  model_config.dtype = "float32"
  model = models.get(model_config)
  encoder = (ENCODER_TOKENS, ENCODER_MASK, _positions(ENCODER_TOKENS))
  if model_config.family == "bert":
    return np.asarray(jax.jit(model.apply)({"params": params}, *encoder))
  decoder = (DECODER_TOKENS, np.ones_like(DECODER_TOKENS), _positions(DECODER_TOKENS))
  return np.asarray(jax.jit(model.apply)({"params": params}, *encoder, *decoder))


def _assert_same_logits(ours: np.ndarray, theirs: np.ndarray, family: str) -> None:
  if family == "bert":  # padded positions differ (transformers lets them attend to the text); nothing reads them
    ours, theirs = ours[ENCODER_MASK == 1], theirs[ENCODER_MASK == 1]
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def _family(name: str) -> str:
  return name.split("_")[0]


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_imported_transformers_model_gives_its_logits(name, tmp_path):
  model = _hf_model(name)
  model.save_pretrained(tmp_path)
  model_config, params = hf.load(str(tmp_path))
  assert model_config.family == _family(name) and model_config.dropout_rate == 0.0
  if name == "t5_tied_wide_heads":
    assert (model_config.head_dim, model_config.num_layers, model_config.num_decoder_layers) == (16, 3, 2)
    assert model_config.tie_embeddings and "lm_head" not in params
  _assert_same_logits(_lm_logits(model_config, params), _hf_logits(model, _family(name)), _family(name))


def test_an_unscaled_t5_saved_without_lm_head_reads_the_embedding_as_its_output_layer(tmp_path):
  """transformers 5 ties T5's lm_head to the shared embedding even when tie_word_embeddings=False (which then
  only turns the scaling off), and saves no lm_head.weight."""
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(_t5_config(d_kv=8, num_layers=1, tie_word_embeddings=False)).eval()
  model.save_pretrained(tmp_path)
  if "lm_head.weight" in hf._read_tensors(str(tmp_path)):
    pytest.skip("this transformers saves T5's lm_head.weight")
  model_config, params = hf.load(str(tmp_path))
  assert not model_config.tie_embeddings
  np.testing.assert_array_equal(params["lm_head"]["kernel"], params["token_embed"]["embedding"].T)
  _assert_same_logits(_lm_logits(model_config, params), _hf_logits(model, "t5"), "t5")


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_export_of_import_reproduces_every_tensor(name, tmp_path):
  _hf_model(name).save_pretrained(tmp_path / "original")
  model_config, params = hf.load(str(tmp_path / "original"))
  hf.save(model_config, params, str(tmp_path / "again"))
  original = hf._read_tensors(str(tmp_path / "original"))
  again = hf._read_tensors(str(tmp_path / "again"))
  assert set(again) == set(original)
  for tensor_name, tensor in again.items():
    np.testing.assert_array_equal(tensor, original[tensor_name], err_msg=tensor_name)


def _lm_model(tiny_config, family: str, overrides: dict):
  """A tiny lm model of `family` with random weights: every norm and bias away from its init (which would hide a
  mix-up of those tensors), drawn in numpy rather than by a compiled model.init."""
  config = tiny_config(family, {"model.num_kv_heads": 4, "model.vocab_size": VOCAB, **overrides})
  shapes = tables.parameter_shapes(config.model, config.model.scan_layers)
  rng = np.random.default_rng(3)

  def draw(path, shape):
    noise = 0.1 * rng.standard_normal(shape).astype(np.float32)
    return noise + 1.0 if path[-1].key == "scale" else noise

  return config, jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: isinstance(x, tuple))


EXPORTS = {
    "bert": ("bert", {}),
    "bert_unscanned": ("bert", {"model.scan_layers": False}),
    "t5_untied": ("t5", {"model.tie_embeddings": False, "model.relative_max_distance": 12}),
    "t5_tied_wide_heads_unscanned": (
        "t5", {"model.head_dim": 16, "model.num_decoder_layers": 3, "model.relative_buckets": 16, "model.scan_layers": False},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_exported_lm_model_gives_lm_logits_in_transformers(tiny_config, name, tmp_path):
  family, overrides = EXPORTS[name]
  config, params = _lm_model(tiny_config, family, overrides)
  hf.save(config.model, params, str(tmp_path))
  auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForSeq2SeqLM
  exported = auto.from_pretrained(str(tmp_path)).eval()
  _assert_same_logits(_hf_logits(exported, family), _lm_logits(config.model, params), family)
  # Read back, the same parameters in the same layout.
  model_config, again = hf.load(str(tmp_path))
  if not config.model.scan_layers:
    model_config.scan_layers = False
    again = hf.from_hf_tensors(model_config, hf._read_tensors(str(tmp_path)))
  assert jax.tree.structure(again) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.parametrize(
    "name, change, named",
    [
        ("bert", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
        ("t5_v1_1", {"feed_forward_proj": "relu"}, "feed_forward_proj='relu' .the original T5's"),
        ("t5_v1_1", {"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu'"),
    ],
)
def test_unsupported_options_are_named_in_one_line(name, change, named, tmp_path):
  _hf_model(name).save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config.update(change)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=named) as error:
    hf.load(str(tmp_path))
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, objective", [("bert", "mlm"), ("t5_v1_1", "span_corruption")])
def test_command_line_import_and_export(name, objective, tmp_path):
  """`python -m lm.interop import` writes a run of the family's pretraining objective holding the weights;
  `export` of that run gives back the same tensors."""
  from lm.interop import __main__ as interop

  hf_dir, workdir, out = tmp_path / "hf", tmp_path / "run", tmp_path / "exported"
  _hf_model(name).save_pretrained(hf_dir)
  if name == "bert":  # the command line once; the same function in-process for the other family
    result = subprocess.run([sys.executable, "-m", "lm.interop", "import", str(hf_dir), f"--workdir={workdir}"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr
  else:
    interop.import_checkpoint(str(hf_dir), str(workdir), None)
  config = json.loads((workdir / "config.json").read_text())
  assert (config["model"]["family"], config["objective"]["name"]) == (_family(name), objective)
  imported = lm.load(str(workdir))
  assert imported.step == 0 and imported.objective.name == objective
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(imported.params), hf.load(str(hf_dir))[1])
  interop.export(str(workdir), None, str(out))
  original, again = hf._read_tensors(str(hf_dir)), hf._read_tensors(str(out))
  assert set(again) == set(original)
  for tensor_name, tensor in again.items():
    np.testing.assert_array_equal(tensor, original[tensor_name], err_msg=tensor_name)
