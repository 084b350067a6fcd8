"""`python -m lm.compile --config=configs/X.py --topology=v5p-64 [--num_slices=N] [--config.a.b=value ...]`.

Will this config train on that TPU slice? Compiles the training step lm.train runs (the same
function, shardings and batch, with abstract inputs: nothing is allocated) for a TPU topology, on
any machine, a CPU-only laptop included (`pip install -e '.[tpu]'` brings the compiler, libtpu),
and prints per chip: parameters + optimizer state, batch, temporaries and their total against the
chip's HBM; XLA's FLOPs per step beside lm's own count; and the compile time. The last line on
stdout is one JSON object. Exits 0 when the step fits, 1 (with one line on what to change) when it
does not.

Topologies: Cloud TPU accelerator types (v4-32, v5p-128, v5e-256 or v5litepod-256, v6e-64: the
number counts TensorCores on v4 and v5p, chips on v5e and v6e) or JAX's names (v5p:4x4x4, v5e:16x16).
Several slices (Multislice, joined over the data-center network): --num_slices=N, which defaults to
the config's mesh.dcn_data x mesh.dcn_fsdp and must equal it.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import time

import jax
import ml_collections
from absl import flags

from lm import cli, metrics
from lm import sharding
from lm.config import ConfigError, UserError
from lm.data import batch as batch_lib
from lm.train import loop

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation as the compiler and Cloud name it."""

  name: str  # JAX's topology prefix: "v5p" in "v5p:4x4x4"
  cloud_names: tuple[str, ...]  # prefixes of Cloud accelerator types: "v5litepod" in "v5litepod-256"
  cores_per_chip: int  # what Cloud's accelerator-type number counts per chip (v5p-128 is 64 chips)
  torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e)
  chip_config: str  # "megacore": a chip's two TensorCores are one JAX device
  hbm_bytes: int  # per chip, what the compiler can use (its out-of-memory error states it; the tests check)


GENERATIONS = (
    Generation("v4", ("v4",), 2, 3, "megacore", int(30.75 * GiB)),
    Generation("v5e", ("v5e", "v5litepod"), 1, 2, "default", int(15.75 * GiB)),
    Generation("v5p", ("v5p",), 2, 3, "megacore", int(95.74 * GiB)),
    Generation("v6e", ("v6e",), 1, 2, "default", int(31.25 * GiB)),
)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its generation and chip grid."""

  generation: Generation
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def name(self) -> str:
    """JAX's name, e.g. v5p:4x4x4."""
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def accelerator_type(self) -> str:
    """Cloud's name, e.g. v5p-128."""
    return f"{self.generation.cloud_names[-1]}-{self.chips * self.generation.cores_per_chip}"

  def chips_per_host(self) -> tuple[int, int, int]:
    """The chips of one TPU VM: 4 (2x2), or all of a slice of 1 or 8 chips (v5e, v6e)."""
    if self.generation.torus_dims == 2 and self.chips in (1, 8):
      return (*self.shape, 1)
    return (2, 2, 1)


def standard_shape(chips: int, torus_dims: int) -> tuple[int, ...]:
  """Cloud's shape for a slice of `chips` chips: doubling the shortest axis (the last of equals) from 2x2(x1).

  4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4 (3D); 8 -> 2x4, 16 -> 4x4, 32 -> 4x8 (2D).
  """
  shape = [1] * torus_dims if chips < 4 else [2, 2] + [1] * (torus_dims - 2)
  while math.prod(shape) < chips:
    shortest = min(shape)
    axis = max(i for i, size in enumerate(shape) if size == shortest)
    shape[axis] *= 2
  if math.prod(shape) != chips:
    raise ValueError(f"{chips} chips is not a slice size TPUs come in (a power of two)")
  return tuple(sorted(shape)) if torus_dims == 2 else tuple(shape)


def parse_topology(name: str) -> Topology:
  """v5p-128, v5litepod-256, v5e-16, v6e-64, v4-32 (Cloud's names) or v5p:4x4x4, v5e:16x16 (JAX's)."""
  names = ", ".join(f"{g.cloud_names[-1]}-N or {g.name}:AxB{'xC' if g.torus_dims == 3 else ''}" for g in GENERATIONS)
  match = re.fullmatch(r"(v[0-9a-z]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  generation = match and next((g for g in GENERATIONS if match.group(1) in (g.name, *g.cloud_names)), None)
  if not generation:
    raise UserError(f"--topology={name}: not a TPU topology; use one of {names}")
  if match.group(3):
    shape = tuple(int(size) for size in match.group(3).split("x"))
    if len(shape) != generation.torus_dims:
      raise UserError(f"--topology={name}: {generation.name} slices have {generation.torus_dims} axes")
    return Topology(generation, shape)
  cores = int(match.group(2))
  if cores % generation.cores_per_chip:
    raise UserError(f"--topology={name}: {generation.name} counts {generation.cores_per_chip} cores per chip")
  try:
    return Topology(generation, standard_shape(cores // generation.cores_per_chip, generation.torus_dims))
  except ValueError as error:
    raise UserError(f"--topology={name}: {error}") from None


def topology_devices(topology: Topology, num_slices: int) -> list[jax.Device]:
  """Compile-only devices of `num_slices` slices of `topology` (libtpu; no TPU needed)."""
  if importlib.util.find_spec("libtpu") is None:
    raise UserError("compiling for a TPU needs libtpu: pip install -e '.[tpu]'")
  # Off a TPU VM, libtpu would look for the VM's metadata and print warnings about it.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ["TPU_ACCELERATOR_TYPE"] = topology.accelerator_type  # what is compiled for, not this machine
  # Compiling touches no TPU, so another process using libtpu (a training run, a second check) is no conflict.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    description = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology.name,
        chip_config_name=topology.generation.chip_config,
        chips_per_host_bounds=topology.chips_per_host(),
        num_slices=num_slices,
    )
  except (RuntimeError, ValueError) as error:
    raise UserError(f"--topology={topology.name}: libtpu cannot make it ({' '.join(str(error).split())[:200]})") from None
  return list(description.devices)


def _shard_bytes(abstract_tree) -> int:
  """Bytes each device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_tree))


def _out_of_memory_temp_bytes(error: Exception) -> int | None:
  """The bytes per chip of temporaries a RESOURCE_EXHAUSTED compile error says the program needs."""
  units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  match = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(error))
  match = match or re.search(r"Used ([\d.]+)([KMGT]) of", str(error))
  return int(float(match.group(1)) * units[match.group(2)]) if match else None


def _advice(config: ml_collections.ConfigDict, report: dict) -> str:
  """What to change when the step does not fit, most effective first."""
  shard_state = "shard parameters and optimizer state over every chip (--config.mesh.fsdp=-1 --config.mesh.data=1)"
  if report["state_bytes_per_device"] > report["hbm_bytes_per_device"]:
    gib = report["state_bytes_per_device"] / GiB
    if config.mesh.data != 1 or config.mesh.fsdp != -1:
      return f"parameters and optimizer state alone take {gib:,.2f} GiB per chip: {shard_state}, or take a larger slice"
    return f"parameters and optimizer state alone take {gib:,.2f} GiB per chip: take a larger slice"
  changes = []
  if config.mesh.data != 1 and report["state_bytes_per_device"] > report["bytes_per_device"] / 4:
    changes.append(shard_state)
  if config.model.remat_policy != "full":
    changes.append("recompute activations (--config.model.remat_policy=full)")
  if report["rows_per_device_per_microbatch"] >= 2:
    changes.append(f"split the batch further (--config.train.microbatches={2 * config.train.microbatches})")
  changes.append("take a larger slice")
  return "; or ".join(changes)


def compile_step(config: ml_collections.ConfigDict, devices: list[jax.Device], hbm_bytes: int) -> dict:
  """Compiles `config`'s training step for `devices` (compile-only ones are fine), without allocating
  anything; returns what each device would hold against `hbm_bytes`, and whether it fits."""
  run = loop.setup(config, devices, prepare_data=False)
  batch = batch_lib.abstract(config, run.mesh, run.axis_rules)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  data_parallel = sharding.data_parallel(run.mesh, run.axis_rules)  # dcn sizes included
  report = {
      "devices": len(devices),
      "state_bytes_per_device": _shard_bytes(run.abstract_state),
      "batch_bytes_per_device": _shard_bytes(batch),
      "rows_per_device_per_microbatch": config.data.batch_size / data_parallel / config.train.microbatches,
      "hbm_bytes_per_device": hbm_bytes,
      "lm_flops_per_step": metrics.flops_per_token(config.model, config.data.seq_len) * config.data.batch_size * config.data.seq_len,
  }
  started = time.perf_counter()
  try:
    compiled = run.train_step.lower(run.abstract_state, batch, rng).compile()
  except Exception as error:  # XLA says RESOURCE_EXHAUSTED when the step cannot fit: report it like a misfit
    temp_bytes = _out_of_memory_temp_bytes(error)
    if "RESOURCE_EXHAUSTED" not in str(error) or temp_bytes is None:
      raise
    total = report["state_bytes_per_device"] + report["batch_bytes_per_device"] + temp_bytes  # arguments, scratch
    return {**report, "bytes_per_device": total, "temp_bytes_per_device": temp_bytes, "xla_flops_per_step": None,
            "custom_calls": [], "compile_seconds": time.perf_counter() - started, "fits": False}  # fmt: skip
  compile_seconds = time.perf_counter() - started
  memory = compiled.memory_analysis()
  # Arguments (state, batch) and outputs (the new state, aliased onto the donated old one; metrics), plus scratch.
  total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0)) * len(devices) if cost else None
  return {
      **report,
      "bytes_per_device": total,
      "temp_bytes_per_device": memory.temp_size_in_bytes,
      "xla_flops_per_step": xla_flops,
      "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))),
      "compile_seconds": compile_seconds,
      "fits": total <= hbm_bytes,
  }


def compile_for(config: ml_collections.ConfigDict, topology: Topology, num_slices: int | None = None) -> dict:
  """Compiles `config`'s training step for `num_slices` slices of `topology` (default: as many as the
  config's dcn mesh axes span); returns the fit report."""
  num_sliced = config.mesh.dcn_data * config.mesh.dcn_fsdp
  num_slices = num_sliced if num_slices is None else num_slices
  if num_sliced != num_slices:
    raise ConfigError(
        f"mesh.dcn_data: --num_slices={num_slices} needs mesh.dcn_data x mesh.dcn_fsdp = {num_slices}, got {num_sliced}"
    )
  devices = topology_devices(topology, num_slices)
  where = {"topology": topology.name, "accelerator_type": topology.accelerator_type, "num_slices": num_slices}
  return {**where, **compile_step(config, devices, topology.generation.hbm_bytes)}


def _table(report: dict) -> str:
  """The per-chip memory table and the FLOP counts, for people."""

  def gib(value):
    return "n/a" if value is None else f"{value / GiB:,.2f} GiB"

  def flops(value):
    return "n/a" if not value else f"{value:.3e}"

  rows = [
      ("topology", f"{report['accelerator_type']} ({report['topology']}) x {report['num_slices']} slice(s), {report['devices']} chips"),
      ("parameters + optimizer state", gib(report["state_bytes_per_device"])),
      ("batch", gib(report["batch_bytes_per_device"])),
      ("temporaries", gib(report["temp_bytes_per_device"])),
      ("total per chip", f"{gib(report['bytes_per_device'])} of {gib(report['hbm_bytes_per_device'])} HBM"),
      ("FLOPs per step, XLA", f"{flops(report['xla_flops_per_step'])} (each loop body counted once; none inside Pallas kernels)"),
      ("FLOPs per step, lm", f"{flops(report['lm_flops_per_step'])} (6 per weight per token + attention scores, halved when causal)"),
      ("compile time", f"{report['compile_seconds']:.1f} s"),
  ]
  return "\n".join(f"{name:>30}  {value}" for name, value in rows)


def main() -> None:
  """`python -m lm.compile`: prints the report; exits 1 with what to change when the step does not fit."""
  topology_flag = flags.DEFINE_string("topology", None, "TPU topology: v5p-128, v5e-256, v6e-64, v4-32, or v5p:4x4x4.", required=True)
  num_slices = flags.DEFINE_integer("num_slices", None, "Slices joined over the data-center network; default mesh.dcn_data x mesh.dcn_fsdp.")

  def check(config: ml_collections.ConfigDict) -> None:
    jax.config.update("jax_platforms", "cpu")  # the TPU is only compiled for: never take this host's accelerators
    topology = parse_topology(topology_flag.value)
    report = compile_for(config, topology, num_slices.value)
    print(_table(report))
    print(json.dumps(report), flush=True)
    if not report["fits"]:
      over = report["bytes_per_device"] - report["hbm_bytes_per_device"]
      raise UserError(
          f"does not fit: the step needs {report['bytes_per_device'] / GiB:,.2f} GiB per chip, {over / GiB:,.2f} GiB more "
          f"than a {topology.generation.name} chip's {report['hbm_bytes_per_device'] / GiB:,.2f} GiB; "
          + _advice(config, report)
      )

  cli.run_with_config(check)


if __name__ == "__main__":
  main()
