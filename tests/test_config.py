"""A config that cannot work fails before compiling, with one line naming the field."""

import importlib.util
import os
import subprocess
import sys

import pytest

from lm import config as config_lib
from lm.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_CONFIGS = [
    ({"model.num_heads": 5}, "model.num_heads"),  # does not divide embed_dim=32
    ({"model.num_kv_heads": 3}, "model.num_kv_heads"),  # does not divide num_heads=4
    ({"model.num_heads": 2, "model.num_kv_heads": 2, "mesh.data": 1, "mesh.tensor": 4, "mesh.fsdp": 2}, "model.num_heads"),
    ({"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "model.num_kv_heads": 1}, "model.num_kv_heads"),
    ({"data.batch_size": 12, "mesh.data": 8}, "data.batch_size"),  # 12 rows over 8 devices
    ({"data.batch_size": 0}, "data.batch_size"),
    ({"train.microbatches": 2, "mesh.data": 8}, "train.microbatches"),  # 8 rows: 2 x 4 < 8 devices
    ({"mesh.data": 2, "mesh.fsdp": 2}, "mesh"),  # 4 devices of 8
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh.fsdp"),
    ({"mesh.data": -1, "mesh.tensor": 3}, "mesh.data"),
    ({"mesh.dcn_data": 3}, "mesh.dcn_data"),
    ({"model.attention": "flash"}, "model.attention"),
    ({"model.remat_policy": "some"}, "model.remat_policy"),
    ({"model.scan_unroll": -1}, "model.scan_unroll"),
    ({"model.fp8_matmuls": True, "model.dtype": "float16"}, "model.fp8_matmuls"),
    ({"model.cudnn_max_documents": 0}, "model.cudnn_max_documents"),
    ({"model.loss_chunk_len": -1}, "model.loss_chunk_len"),
    ({"train.profile_steps": -2}, "train.profile_steps"),
    ({"model.family": "bert"}, "model.family"),
    ({"model.dtype": "float8"}, "model.dtype"),
    ({"data.seq_len": 128}, "data.seq_len"),  # longer than max_seq_len=64
    ({"data.seq_len": 15, "mesh.data": 1, "mesh.sequence": 8}, "data.seq_len"),
    ({"data.source": "s3://bucket"}, "data.source"),
    ({"data.tokenizer_type": "wordpiece"}, "data.tokenizer_type"),
    ({"data.validation_fraction": 1.0}, "data.validation_fraction"),
    ({"optimizer.schedule": "step"}, "optimizer.schedule"),
    ({"optimizer.warmup_steps": 11}, "optimizer.warmup_steps"),  # train.steps=10
    ({"optimizer.no_weight_decay": ("norm", "kernel")}, "optimizer.no_weight_decay"),
    ({"optimizer.learning_rate": float("nan")}, "optimizer.learning_rate"),
    ({"optimizer.learning_rate": -1e-3}, "optimizer.learning_rate"),
    ({"optimizer.learning_rate": float("inf")}, "optimizer.learning_rate"),
    ({"optimizer.eps": -1e-8}, "optimizer.eps"),
    ({"optimizer.eps": 0.0}, "optimizer.eps"),
    ({"optimizer.b2": 1.0}, "optimizer.b2"),
    ({"optimizer.weight_decay": float("nan")}, "optimizer.weight_decay"),
    ({"optimizer.grad_clip_norm": -1.0}, "optimizer.grad_clip_norm"),
    ({"optimizer.min_learning_rate_ratio": 2.0}, "optimizer.min_learning_rate_ratio"),
    ({"model.norm_eps": -1e-5}, "model.norm_eps"),
    ({"model.norm_eps": float("nan")}, "model.norm_eps"),
    ({"model.init_std": 0.0}, "model.init_std"),
    ({"train.z_loss_weight": -1.0}, "train.z_loss_weight"),
    ({"model.rope_scaling": "yarn"}, "model.rope_scaling"),
    ({"model.rope_scaling": "linear", "model.family": "gpt2"}, "model.rope_scaling"),
    ({"model.rope_scaling": "linear", "model.rope_scaling_factor": 0.0}, "model.rope_scaling_factor"),
    ({"model.rope_scaling": "llama3", "model.rope_low_freq_factor": float("nan")}, "model.rope_low_freq_factor"),
    ({"model.rope_scaling": "llama3", "model.rope_high_freq_factor": 1.0}, "model.rope_high_freq_factor"),  # = low
    ({"model.rope_scaling": "llama3", "model.rope_original_max_seq_len": 0}, "model.rope_original_max_seq_len"),
    ({"objective.name": "dpo"}, "objective.name"),
    ({"objective.name": "sft", "objective.chat_template": "chatml"}, "objective.chat_template"),
    ({"objective.name": "sft"}, "data.source"),  # synthetic tokens are no records
    ({"objective.name": "sft", "data.source": "tfds:lm1b"}, "data.source"),
    ({"objective.name": "classification", "objective.num_classes": 2, "data.source": "builtin"}, "data.source"),
    ({"objective.name": "classification", "data.source": "text:x"}, "objective.num_classes"),  # no classes
    ({"objective.name": "classification", "objective.num_classes": 3, "objective.class_names": "a,b",
      "data.source": "text:x"}, "objective.num_classes"),  # fmt: skip
    ({"checkpoint.init_model": True}, "checkpoint.init_model"),  # without init_from
    ({"model.family": "t5"}, "model.family"),  # causal LM trains decoders
    ({"model.family": "bert", "objective.name": "span_corruption"}, "model.family"),
    ({"model.family": "bert", "objective.name": "mlm"}, "data.source"),  # synthetic data has no mask token
    ({"model.family": "bert", "objective.name": "mlm", "objective.mask_rate": 0.0, "data.source": "builtin"}, "objective.mask_rate"),
    ({"model.family": "t5", "objective.name": "span_corruption", "objective.noise_density": 1.0}, "objective.noise_density"),
    ({"model.family": "t5", "objective.name": "span_corruption", "objective.mean_span_length": 0.5}, "objective.mean_span_length"),
    ({"model.family": "t5", "objective.name": "span_corruption", "data.source": "builtin", "data.tokenizer_vocab_size": 300},
     "data.tokenizer_vocab_size"),  # fmt: skip  (100 sentinels do not fit)
    ({"model.family": "t5", "model.relative_buckets": 2}, "model.relative_buckets"),
    ({"model.family": "t5", "model.relative_max_distance": 4}, "model.relative_max_distance"),  # 32 buckets: > 8
    ({"model.head_dim": -1}, "model.head_dim"),
    ({"model.num_heads": 5, "model.head_dim": 8, "model.num_kv_heads": 5}, None),  # a head_dim of its own: any head count
]


@pytest.mark.parametrize("overrides, field", BAD_CONFIGS)
def test_bad_config_names_the_field(tiny_config, overrides, field):
  if field is None:  # a case that looks bad but is not
    config_lib.validate(tiny_config("llama", overrides), num_devices=8)
    return
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(tiny_config("llama", overrides), num_devices=8)
  assert str(error.value).startswith(field + ":")
  assert "\n" not in str(error.value)


# Sizes only the parameter shapes reveal; caught when the run is set up, still before compiling.
INDIVISIBLE_PARAMETERS = [
    ({"model.vocab_size": 101, "mesh.data": 4, "mesh.tensor": 2}, "model.vocab_size"),
    ({"model.mlp_dim": 63, "mesh.data": 4, "mesh.tensor": 2}, "model.mlp_dim"),
    ({"model.embed_dim": 36, "model.num_heads": 2, "mesh.data": 1, "mesh.fsdp": 8}, "model.embed_dim"),
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("overrides, field", INDIVISIBLE_PARAMETERS)
def test_a_parameter_the_mesh_cannot_split_names_the_field(tiny_config, family, overrides, field):
  with pytest.raises(config_lib.ConfigError) as error:
    loop.setup(tiny_config(family, overrides))
  assert str(error.value).startswith(field + ":")
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_good_configs_pass(tiny_config, family):
  config_lib.validate(tiny_config(family, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), num_devices=8)


def test_mesh_shape_fills_minus_one_and_multiplies_dcn(tiny_config):
  mesh = tiny_config().mesh
  mesh.data, mesh.fsdp, mesh.tensor, mesh.dcn_data = 1, -1, 2, 2
  ici, dcn = config_lib.mesh_shape(mesh, num_devices=16)
  assert ici == {"stage": 1, "data": 1, "fsdp": 4, "expert": 1, "tensor": 2, "sequence": 1}
  assert dcn == {"stage": 1, "data": 2, "fsdp": 1, "expert": 1, "tensor": 1, "sequence": 1}


def test_the_config_declares_the_mesh_axes_and_the_rules_the_batch_axes(tiny_config):
  mesh = tiny_config().mesh
  mesh.axes = ("data", "fsdp", "tensor")
  mesh.logical_axis_rules = tuple((name, axes) for name, axes in mesh.logical_axis_rules if name not in ("activation_batch",))
  with pytest.raises(config_lib.ConfigError, match="^mesh.logical_axis_rules: '.*' maps to mesh axis '(stage|expert)', which mesh.axes"):
    config_lib.mesh_shape(mesh, num_devices=8)
  mesh.logical_axis_rules = (("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
  mesh.data, mesh.fsdp, mesh.tensor = -1, 2, 2
  assert config_lib.mesh_shape(mesh, num_devices=8)[0] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert config_lib.batch_axes(mesh) == ("data", "fsdp")
  assert config_lib.batch_axes(tiny_config().mesh) == ("data", "fsdp", "expert")


@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.model.num_heads=5", "model.num_heads"),
        ("--config.model.no_such_field=1", "--config.model.no_such_field;"),
        ("--config.model.num_layer=3", '--config.model.num_layer (did you mean "num_layers"?);'),  # no \' or \n
        ("--config.modle.num_layers=3", '--config.modle.num_layers (did you mean "model"?);'),  # a section
        ("--config.optimizer.learning_rate=nan", "optimizer.learning_rate: must be a finite number"),
    ],
)
def test_cli_reports_a_bad_config_in_one_line(tmp_path, override, field):
  result = subprocess.run(
      [sys.executable, "-m", "lm.train", "--config=configs/quickstart.py", f"--workdir={tmp_path}", override],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode != 0
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert field in result.stderr


def test_an_error_of_the_command_itself_is_not_called_an_unknown_field():
  script = "from lm import cli\ndef broken():\n  raise AttributeError('no attribute shape')\ncli.run(broken)"
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  assert "AttributeError: no attribute shape" in result.stderr and "unknown config field" not in result.stderr


def test_from_run_fills_fields_the_run_did_not_have_yet_with_defaults(tmp_path):
  """A run saved before a field existed (objective.*, say) still loads, and the field can be overridden."""
  import json

  from lm.config import load_config_file

  saved = json.loads(load_config_file(os.path.join(REPO, "configs", "quickstart.py")).to_json())
  del saved["objective"], saved["model"]["loss_chunk_len"]
  saved["model"]["num_layers"] = 3
  (tmp_path / "config.json").write_text(json.dumps(saved))
  spec = importlib.util.spec_from_file_location("from_run", os.path.join(REPO, "configs", "from_run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(str(tmp_path))
  assert config.model.num_layers == 3 and config.objective.name == "causal_lm" and config.model.loss_chunk_len == 128
  assert config.mesh.logical_axis_rules == load_config_file(os.path.join(REPO, "configs", "default.py")).mesh.logical_axis_rules
  config.objective.name = "sft"
  config_lib.validate(config, 8)
