"""`python -m lm.compile`: TPU topologies by name, HBM per chip, the fit report, and the shipped configs' fit.

These compile for real TPU topologies on the CPU with libtpu (`pip install -e '.[tpu]'`), ahead of time.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import compile as compile_lib
from lm.config import ConfigError, UserError, load_config_file

pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu: pip install -e '.[tpu]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name, jax_name, accelerator_type",
    [
        ("v5p-8", "v5p:2x2x1", "v5p-8"),
        ("v5p-64", "v5p:2x4x4", "v5p-64"),
        ("v5p-128", "v5p:4x4x4", "v5p-128"),
        ("v5p-256", "v5p:4x4x8", "v5p-256"),
        ("v4-32", "v4:2x2x4", "v4-32"),
        ("v5e-16", "v5e:4x4", "v5litepod-16"),
        ("v5litepod-8", "v5e:2x4", "v5litepod-8"),
        ("v5e-256", "v5e:16x16", "v5litepod-256"),
        ("v6e-64", "v6e:8x8", "v6e-64"),
        ("v6e-1", "v6e:1x1", "v6e-1"),
        ("V5P:4x4x8", "v5p:4x4x8", "v5p-256"),
        ("v5e:4x8", "v5e:4x8", "v5litepod-32"),
    ],
)
def test_topology_names(name, jax_name, accelerator_type):
  topology = compile_lib.parse_topology(name)
  assert (topology.name, topology.accelerator_type) == (jax_name, accelerator_type)


@pytest.mark.parametrize("name", ["v5p-12", "v7x-8", "h100-8", "v5p:4x4", "v5e-6", "v4-7"])
def test_unknown_topologies_are_one_line_errors(name):
  with pytest.raises(UserError, match=re.escape(f"--topology={name}")):
    compile_lib.parse_topology(name)


def test_without_libtpu_it_says_what_to_install(monkeypatch):
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "libtpu" else find_spec(name, *args))
  with pytest.raises(UserError, match=re.escape("compiling for a TPU needs libtpu: pip install -e '.[tpu]'")):
    compile_lib.topology_devices(compile_lib.parse_topology("v5e-4"), 1)


@pytest.mark.parametrize("name", ["v4-16", "v5p-16", "v5e-8", "v6e-4", "v5e-1"])
def test_libtpu_makes_one_device_per_chip(name):
  topology = compile_lib.parse_topology(name)
  devices = compile_lib.topology_devices(topology, num_slices=1)
  assert len(devices) == topology.chips
  assert {device.platform for device in devices} == {"tpu"}


@pytest.mark.parametrize("generation", compile_lib.GENERATIONS, ids=lambda g: g.name)
def test_hbm_table_is_what_the_compiler_allows(generation):
  """A program too large for a chip fails to compile, and the compiler's error states the chip's HBM."""
  topology = compile_lib.parse_topology(f"{generation.name}:{'x'.join(['2'] * generation.torus_dims)}")
  mesh = Mesh(np.array(compile_lib.topology_devices(topology, 1)), ("chips",))
  per_chip_rows = 1 << 20  # x 16384 float32 = 64 GiB per chip, more than any TPU has
  x = jax.ShapeDtypeStruct((per_chip_rows * mesh.size, 16384), jnp.float32, sharding=NamedSharding(mesh, P("chips")))
  with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as error:
    jax.jit(lambda x: jnp.sin(x) @ jnp.ones((16384, 16384))).lower(x).compile()
  available = re.search(r"available HBM \(([\d.]+)G\)", str(error.value))
  assert available, str(error.value)
  assert generation.hbm_bytes == pytest.approx(float(available.group(1)) * 2**30, rel=1e-3)


def _tiny(**overrides):
  config = load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
  config.data.source = "synthetic"
  config.model.vocab_size = 1024
  config.model.num_layers = 2
  config.data.batch_size = 16
  config.mesh.data = 1
  config.mesh.fsdp = -1
  for path, value in overrides.items():
    section, field = path.split(".")
    config[section][field] = value
  return config


def test_report_counts_what_each_chip_holds():
  """The step compiles with splash attention's Pallas kernel; state and batch per chip are the shards' bytes."""
  config = _tiny()
  report = compile_lib.compile_for(config, compile_lib.parse_topology("v5e-8"))
  assert report["fits"] and report["devices"] == 8
  assert "tpu_custom_call" in report["custom_calls"]  # model.attention=auto on a TPU: the Pallas splash kernel
  # Parameters, and the two AdamW moments, in float32, sharded 8 ways (fsdp=-1): 1/8 of them on each chip.
  parameters = 1024 * 128 + 2 * (2 * 128 + 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384) + 128
  assert report["state_bytes_per_device"] == pytest.approx(3 * 4 * parameters / 8, rel=0.01)
  assert report["batch_bytes_per_device"] == 4 * 4 * (16 // 8) * 128  # inputs, targets, positions, weights (synthetic: no segment_ids)
  assert report["bytes_per_device"] >= report["state_bytes_per_device"] + report["batch_bytes_per_device"]
  assert report["hbm_bytes_per_device"] == compile_lib.parse_topology("v5e-8").generation.hbm_bytes


def test_xla_attention_has_no_kernel():
  report = compile_lib.compile_for(_tiny(**{"model.attention": "xla"}), compile_lib.parse_topology("v5e-8"))
  assert "tpu_custom_call" not in report["custom_calls"]


def test_a_mixture_of_experts_compiles_with_its_experts_split_over_chips():
  """configs/moe_tiny.py's block on a v5p-8 (4 chips): experts over the expert axis, FSDP inside it."""
  config = load_config_file(os.path.join(REPO, "configs", "moe_tiny.py"))
  config.data.source = "synthetic"
  config.model.vocab_size = 1024
  config.mesh.update(data=1, expert=4, fsdp=1)
  report = compile_lib.compile_for(config, compile_lib.parse_topology("v5p-8"))
  assert report["fits"] and report["devices"] == 4
  # Each chip holds 2 of the 8 experts: expert weights and their AdamW moments split 4 ways.
  experts = config.model.num_layers * 8 * 3 * 128 * 96
  others = 1024 * 128 + config.model.num_layers * (2 * 128 + 2 * 128 * 128 + 2 * 128 * 64 + 128 * 8) + 128
  assert report["state_bytes_per_device"] == pytest.approx(3 * 4 * (experts / 4 + others), rel=0.01)


def test_a_pipelined_model_compiles_with_its_stages_on_their_own_chips():
  """Two stages of one layer each on a v5p-8 (4 chips), FSDP over the other 2: each chip holds half the layers."""
  report = compile_lib.compile_for(_tiny(**{"mesh.stage": 2, "mesh.fsdp": 2}), compile_lib.parse_topology("v5p-8"))
  assert report["fits"] and report["devices"] == 4
  layers = 2 * (2 * 128 + 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384)
  others = 1024 * 128 + 128
  assert report["state_bytes_per_device"] == pytest.approx(3 * 4 * (layers / 4 + others / 2), rel=0.01)


def test_slices_must_match_the_dcn_mesh():
  with pytest.raises(ConfigError, match="mesh.dcn_data: --num_slices=2"):
    compile_lib.compile_for(_tiny(), compile_lib.parse_topology("v5e-4"), num_slices=2)


def test_two_slices_data_parallel_over_dcn():
  report = compile_lib.compile_for(_tiny(**{"mesh.dcn_data": 2}), compile_lib.parse_topology("v5e-4"))
  assert report["fits"] and report["num_slices"] == 2 and report["devices"] == 8


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "lm.compile", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS=""),  # what a user has: lm.compile itself keeps jax off this host's devices
  )  # fmt: skip


SMALL = ["--config=configs/quickstart.py", "--config.data.source=synthetic", "--config.model.vocab_size=1024",
         "--config.model.num_layers=2"]  # fmt: skip
# Two layers 8192 wide with float32 AdamW: 2.1B parameters, 34 GB of state, on every chip when replicated.
WIDE = [*SMALL, "--config.model.embed_dim=8192", "--config.model.mlp_dim=32768", "--config.model.num_heads=64",
        "--config.model.num_kv_heads=8"]  # fmt: skip


def test_cli_fits_prints_table_and_json_last():
  result = _cli(*SMALL, "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--topology=v5p-16")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert any("parameters + optimizer state" in line for line in lines)
  report = json.loads(lines[-1])
  assert report["fits"] and report["topology"] == "v5p:2x2x2" and report["devices"] == 8
  assert report["bytes_per_device"] <= report["hbm_bytes_per_device"]
  assert "libtpu" not in result.stderr and "TPU_" not in result.stderr  # its warnings are silenced


def test_cli_does_not_fit_says_how_much_and_what_to_change():
  result = _cli(*WIDE, "--config.mesh.data=-1", "--topology=v5e-4")
  assert result.returncode == 1
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert not report["fits"] and report["bytes_per_device"] > report["hbm_bytes_per_device"]
  (error,) = result.stderr.strip().splitlines()
  assert error.startswith("error: does not fit:") and "GiB more than a v5e chip's 15.75 GiB" in error
  assert "parameters and optimizer state alone take" in error and "--config.mesh.fsdp=-1" in error


def test_activations_that_do_not_fit_suggest_remat_and_microbatches():
  """A small model on a million tokens per chip: the state fits, the activations do not."""
  result = _cli(*SMALL, "--config.data.batch_size=32768", "--topology=v5e-4")
  assert result.returncode == 1
  (error,) = result.stderr.strip().splitlines()
  assert "--config.model.remat_policy=full" in error and "--config.train.microbatches=2" in error
  assert "alone take" not in error


def test_cli_config_that_cannot_shard_is_a_config_error():
  result = _cli(*WIDE, "--config.mesh.data=1", "--config.mesh.tensor=3", "--config.mesh.fsdp=-1", "--topology=v5e-4")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: config ")


# The shipped configs state in their docstrings where they fit; each is compiled for that topology.
SHIPPED = [("llama_1b.py", "v5p-8"), ("llama_8b.py", "v5p-64")]


@pytest.mark.parametrize("config_file, topology", SHIPPED)
def test_shipped_config_fits_where_its_docstring_says(config_file, topology):
  config = load_config_file(os.path.join(REPO, "configs", config_file))
  report = compile_lib.compile_for(config, compile_lib.parse_topology(topology))
  assert report["fits"]
  with open(os.path.join(REPO, "configs", config_file)) as f:
    docstring = f.read().split('"""')[1]
  stated = re.search(rf"{re.escape(topology)}: ([\d.]+) GiB per chip", docstring)
  assert stated, f"{config_file} does not say how much of a {topology} chip it uses"
  assert report["bytes_per_device"] / 2**30 == pytest.approx(float(stated.group(1)), rel=0.1)


def test_libtpu_stays_quiet_on_a_machine_without_tpu_chips():
  """With the tpu extra installed, lm's commands start on the CPU without libtpu's TPU-VM warnings."""
  env = {name: value for name, value in os.environ.items() if not name.startswith(("TPU_", "JAX_PLATFORMS"))}
  result = subprocess.run(
      [sys.executable, "-c", "import lm, jax; print(jax.devices()[0].platform)"],
      cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
  )  # fmt: skip
  assert result.stdout.strip() == "cpu"
  assert result.stderr == "", result.stderr
