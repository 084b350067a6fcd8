"""Hugging Face interop of Mixtral (llama family, model.num_experts > 0): transformers' logits, both on-disk
layouts of the experts, export(import(x)) == x, an lm-initialized mixture of experts read by transformers."""

import json

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
from lm.models import Transformer  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12))
NUM_EXPERTS, WIDTH = 4, 48


def _hf_mixtral():
  """A small Mixtral whose weights are large enough for the experts to move the logits, and whose router is far
  from uniform (at transformers' 0.02 init every token's choice would be a near tie) yet not so sharp that the
  second expert's share vanishes: the top two's probabilities sum to about 0.8, so their renormalization shows."""
  torch.manual_seed(0)
  config = transformers.MixtralConfig(
      vocab_size=128, hidden_size=32, intermediate_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2, max_position_embeddings=64,
      rope_theta=500.0, rms_norm_eps=1e-5, router_aux_loss_coef=0.02, tie_word_embeddings=False,
      initializer_range=0.2,
  )  # fmt: skip
  model = transformers.MixtralForCausalLM(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "norm" in name:  # norms at 1 would hide a mix-up of those tensors
        parameter.add_(torch.randn_like(parameter) * 0.1)
      if name.endswith("mlp.gate.weight"):
        parameter.normal_(0.0, 0.2)
  return model


def _router_margin(model, tokens: np.ndarray = TOKENS) -> float:
  """The smallest gap, over layers and tokens, between the router logits of the last chosen and the first unchosen
  expert. Parity within 1e-4 is only meaningful (and only stable) where no rounding could flip a choice."""
  with torch.no_grad():
    router_logits = model(torch.tensor(tokens), output_router_logits=True).router_logits
  top = [torch.topk(logits, 3, dim=-1).values for logits in router_logits]
  return min((values[:, 1] - values[:, 2]).min().item() for values in top)


def _hf_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _lm_logits(model_config, params, tokens: np.ndarray = TOKENS) -> np.ndarray:
  model_config = ml_collections.ConfigDict(model_config)
  model_config.dtype = "float32"
  model = Transformer(ml_collections.FrozenConfigDict(model_config))
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(jax.jit(model.apply)({"params": params}, tokens, np.ones_like(tokens), positions))


def _legacy_tensors(model) -> dict[str, np.ndarray]:
  """The Hub's Mixtral layout, written here from the model's fused experts rather than by transformers' own
  reverse conversion: per expert w1 (gate) and w3 (up) [F, D], w2 (down) [D, F], under block_sparse_moe."""
  tensors = {}
  for name, value in model.state_dict().items():
    value = value.numpy()
    prefix, _, rest = name.partition(".mlp.")
    if rest == "gate.weight":
      tensors[f"{prefix}.block_sparse_moe.gate.weight"] = value
    elif rest == "experts.gate_up_proj":
      for j in range(NUM_EXPERTS):
        tensors[f"{prefix}.block_sparse_moe.experts.{j}.w1.weight"] = value[j, :WIDTH]
        tensors[f"{prefix}.block_sparse_moe.experts.{j}.w3.weight"] = value[j, WIDTH:]
    elif rest == "experts.down_proj":
      for j in range(NUM_EXPERTS):
        tensors[f"{prefix}.block_sparse_moe.experts.{j}.w2.weight"] = value[j]
    else:
      tensors[name] = value
  return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def test_imported_mixtral_gives_its_logits_scanned_or_not(tmp_path):
  model = _hf_mixtral()
  model.save_pretrained(tmp_path)
  model_config, params = hf.load(str(tmp_path))
  assert (model_config.family, model_config.num_experts, model_config.experts_per_token) == ("llama", NUM_EXPERTS, 2)
  assert (model_config.expert_capacity_factor, model_config.router_aux_loss_weight) == (0.0, 0.02)
  expected = _hf_logits(model)
  assert _router_margin(model) > 1e-3
  np.testing.assert_allclose(_lm_logits(model_config, params), expected, atol=1e-4)

  unscanned_config = ml_collections.ConfigDict(model_config)
  unscanned_config.scan_layers = False
  unscanned = hf.from_hf_tensors(unscanned_config, hf._read_tensors(str(tmp_path)))
  assert "layers_0" in unscanned and "layers" in params
  np.testing.assert_allclose(_lm_logits(unscanned_config, unscanned), expected, atol=1e-4)

  # So the checks above can fail: each token's experts, moved one place along the expert axis.
  moe = params["layers"]["mlp"]
  rolled = {**moe, **{key: np.roll(moe[key], 1, axis=1) for key in ("gate", "up", "down")}}
  wrong = _lm_logits(model_config, {**params, "layers": {**params["layers"], "mlp": rolled}})
  assert np.abs(wrong - expected).max() > 1e-2


def test_both_expert_layouts_import_alike(tmp_path):
  """transformers 5 fuses the experts in memory (gate_up_proj, down_proj) but save_pretrained writes them back per
  expert, as the Hub's checkpoints hold them; save_original_format=False writes the fused tensors."""
  model = _hf_mixtral()
  model.save_pretrained(tmp_path / "saved")
  written = hf._read_tensors(str(tmp_path / "saved"))
  assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in written
  assert not any(".mlp." in name for name in written)
  model.save_pretrained(tmp_path / "fused", save_original_format=False)
  assert "model.layers.1.mlp.experts.gate_up_proj" in hf._read_tensors(str(tmp_path / "fused"))
  (tmp_path / "legacy").mkdir()
  (tmp_path / "legacy" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
  legacy_file = str(tmp_path / "legacy" / "model.safetensors")
  safetensors_numpy.save_file(_legacy_tensors(model), legacy_file, metadata={"format": "pt"})

  _, saved = hf.load(str(tmp_path / "saved"))
  for layout in ("fused", "legacy"):
    _, params = hf.load(str(tmp_path / layout))
    jax.tree.map(np.testing.assert_array_equal, params, saved)


def test_export_of_import_reproduces_every_tensor(tmp_path):
  _hf_mixtral().save_pretrained(tmp_path / "original")
  model_config, params = hf.load(str(tmp_path / "original"))
  hf.save(model_config, params, str(tmp_path / "again"))
  original = hf._read_tensors(str(tmp_path / "original"))
  again = hf._read_tensors(str(tmp_path / "again"))
  assert set(again) == set(original)
  for tensor_name, tensor in again.items():
    np.testing.assert_array_equal(tensor, original[tensor_name], err_msg=tensor_name)
  config = json.loads((tmp_path / "again" / "config.json").read_text())
  assert (config["architectures"], config["model_type"]) == (["MixtralForCausalLM"], "mixtral")
  assert (config["num_local_experts"], config["num_experts_per_tok"], config["router_aux_loss_coef"]) == (4, 2, 0.02)


def test_exported_lm_mixture_of_experts_gives_lm_logits_in_transformers(tiny_config, tmp_path):
  # Capacity is how lm runs the experts; the export is the weights, which transformers runs dropless.
  config = tiny_config("llama", {"model.num_experts": NUM_EXPERTS, "model.experts_per_token": 2,
                                 "model.tie_embeddings": False, "model.expert_capacity_factor": 1.0})  # fmt: skip
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  positions = np.zeros_like(TOKENS)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(3), TOKENS, TOKENS, positions)["params"])
  # Norms at 1 would hide a mix-up of those tensors; a router at init ties its choices.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), params)
  mlp = params["layers"]["mlp"]
  params["layers"]["mlp"] = {**mlp, "router": 0.3 * jax.random.normal(jax.random.key(5), mlp["router"].shape)}
  hf.save(config.model, params, str(tmp_path))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(exported).__name__ == "MixtralForCausalLM"
  assert _router_margin(exported) > 1e-3
  dropless = ml_collections.ConfigDict(config.model)
  dropless.expert_capacity_factor = 0.0
  np.testing.assert_allclose(_hf_logits(exported), _lm_logits(dropless, params), atol=1e-4)


def test_import_writes_a_run_that_gives_the_same_logits(tmp_path):
  from lm.interop import __main__ as interop

  model = _hf_mixtral()
  model.save_pretrained(tmp_path / "hf")
  interop.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"), None)
  run = lm.load(str(tmp_path / "run"))
  assert run.config.model.num_experts == NUM_EXPERTS and run.config.objective.name == "causal_lm"
  np.testing.assert_allclose(_lm_logits(run.config.model, jax.device_get(run.params)), _hf_logits(model), atol=1e-4)


@pytest.mark.parametrize(
    "config, named",
    [
        ({"model_type": "qwen2_moe"}, "model_type 'qwen2_moe' .*shared expert"),
        ({"model_type": "qwen3_moe"}, "model_type 'qwen3_moe' .*q_norm"),
        ({"model_type": "mixtral", "sliding_window": 4096}, "sliding_window=4096"),
        ({"model_type": "mixtral", "router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ],
)
def test_unsupported_mixtures_of_experts_are_named_in_one_line(config, named, tmp_path):
  shape = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_local_experts": 4}  # fmt: skip
  (tmp_path / "config.json").write_text(json.dumps({**shape, **config}))
  with pytest.raises(ConfigError, match=named) as raised:
    hf.load(str(tmp_path))
  assert "\n" not in str(raised.value)


def test_experts_that_do_not_fit_the_config_are_named(tmp_path):
  """A reshape would take 4 experts of width 48 for 3 of width 64 without complaint."""
  _hf_mixtral().save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 3, "intermediate_size": 64}))
  with pytest.raises(ConfigError, match=r"block_sparse_moe.gate.weight gives mlp/router of shape \(32, 4\)"):
    hf.load(str(tmp_path))
