"""A run's checkpoints on disk, as everything that reads them sees them: the Orbax layout, digests, and
reading a step's config or parts of its state. Saving while training is lm/train/checkpoint.py.

A checkpoint holds four items: the TrainState, the data position, the config and metadata (step,
tokens seen, training seconds, lm version). Once a step is complete, the size and CRC32 of each of
its files go into its DIGESTS_FILE; reads check them first.
"""

import concurrent.futures
import json
import os
import zlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from lm import distributed
from lm import workdir as workdir_lib
from lm.config import ConfigError, UserError, absolute_path

ITEMS = ("state", "data", "config", "metadata")
DIGESTS_FILE = "lm_digests.json"


def json_handlers() -> dict[str, ocp.JsonCheckpointHandler]:
  """The handlers of the JSON items (all but the state)."""
  return {name: ocp.JsonCheckpointHandler() for name in ITEMS if name != "state"}


def one_line(error: Exception) -> str:
  """An error's message on one line, at most 200 characters."""
  return " ".join(str(error).split())[:200]


def step_dir(checkpoints: ocp.CheckpointManager, step: int) -> str:
  """The folder of checkpoint `step`."""
  return os.path.join(str(checkpoints.directory), str(step))


def _file_digest(path: str) -> str:
  """"SIZE:CRC32" of a file, read in large blocks (zlib releases the GIL, so files hash in parallel)."""
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(1 << 24):
      crc = zlib.crc32(block, crc)
  return f"{os.path.getsize(path)}:{crc:08x}"


def _file_digests(folder: str) -> dict[str, str]:
  """The digest of every file of a step folder (its own digests file aside), by path inside it."""
  paths = []
  for directory, _, files in os.walk(folder):
    paths += [os.path.join(directory, name) for name in files if not name.startswith(DIGESTS_FILE)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    digests = pool.map(_file_digest, paths)
  return {os.path.relpath(path, folder): digest for path, digest in sorted(zip(paths, digests))}


def write_digests(checkpoints: ocp.CheckpointManager) -> None:
  """Writes the digests of every complete step that has none yet (process 0; call when no save is running).

  A step whose digests cannot be written (a full disk, say) is left without: it is then checked by
  reading it, as a step saved by an older lm is.
  """
  if jax.process_index() != 0:
    return
  for step in checkpoints.all_steps():
    path = os.path.join(step_dir(checkpoints, step), DIGESTS_FILE)
    if os.path.exists(path):
      continue
    partial = f"{path}.partial-{os.getpid()}"
    try:
      digests = _file_digests(step_dir(checkpoints, step))
      with open(partial, "w") as f:
        json.dump(digests, f)
      os.replace(partial, path)
    except OSError as error:  # the step deleted meanwhile (by hand), or no room for the file
      if os.path.exists(partial):
        os.remove(partial)
      if not isinstance(error, FileNotFoundError):
        distributed.log(f"Warning: no digests for checkpoint step {step} ({error}); it will be checked by reading it")


def damage(checkpoints: ocp.CheckpointManager, step: int) -> str | None:
  """What is wrong with a step's files compared with its digests; None when they match (or it has none)."""
  folder = step_dir(checkpoints, step)
  try:
    with open(os.path.join(folder, DIGESTS_FILE)) as f:
      expected = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return f"its {DIGESTS_FILE} is unreadable"
  found = _file_digests(folder)
  for name, digest in sorted(expected.items()):
    if name not in found:
      return f"{name} is missing"
    if found[name] != digest:
      return f"{name} has changed since it was saved"
  return None


def check_intact(checkpoints: ocp.CheckpointManager, step: int) -> None:
  """A UserError naming step `step` and the steps kept, if its files do not match their digests."""
  problem = damage(checkpoints, step)
  if problem:
    others = [other for other in checkpoints.all_steps() if other != step]
    raise UserError(f"checkpoint step {step} in {checkpoints.directory} is damaged ({problem}); kept steps: {others}")


def read_only_manager(path: str) -> ocp.CheckpointManager:
  """A manager for reading the checkpoints of a run's workdir (or of its checkpoints directory)."""
  path = absolute_path(path)
  if os.path.isdir(os.path.join(path, workdir_lib.CHECKPOINTS_DIR)):
    path = os.path.join(path, workdir_lib.CHECKPOINTS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints at {path}")
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns that the directory is read only, which is what is asked
  try:
    return ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), **json_handlers()},  # the state handler reads subtrees
    )
  finally:
    logging.set_verbosity(verbosity)


def first_mismatch(checkpoints: ocp.CheckpointManager, step: int, target: dict[str, Any]) -> str | None:
  """What in `target` (a subtree of the TrainState) the stored state of `step` lacks or holds in another shape."""
  stored = jax.tree_util.tree_flatten_with_path(checkpoints.item_metadata(step)["state"].tree)[0]
  stored_shapes = {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in stored}
  for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = jax.tree_util.keystr(leaf_path, simple=True, separator="/")
    if name not in stored_shapes:
      return f"{name} is not in {checkpoints.directory} (step {step})"
    if stored_shapes[name] != tuple(leaf.shape):
      return f"{name} has shape {stored_shapes[name]} in {checkpoints.directory} but {tuple(leaf.shape)} in this model"
  return None


def restore_parts(checkpoints: ocp.CheckpointManager, step: int | None, target: dict[str, Any], field: str) -> dict[str, Any]:
  """Parts of a saved TrainState (e.g. {"params": abstract params}), read into the target's shardings.

  `step` None means the latest. A part missing from the checkpoint, or of another shape, is a
  ConfigError that names the parameter (and the config `field` that led here).
  """
  step = checkpoints.latest_step() if step is None else step
  if step is None or step not in checkpoints.all_steps():
    raise FileNotFoundError(f"{field}: no checkpoint {'' if step is None else step} in {checkpoints.directory}")
  check_intact(checkpoints, step)
  try:
    mismatch = first_mismatch(checkpoints, step, target)
    if not mismatch:
      restore_args = ocp.checkpoint_utils.construct_restore_args(target)
      state_args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
      return checkpoints.restore(step, args=ocp.args.Composite(state=state_args))["state"]
  except Exception as error:  # Orbax and TensorStore raise many types for files cut short or gone
    raise UserError(f"checkpoint step {step} in {checkpoints.directory} cannot be read ({one_line(error)})") from None
  raise ConfigError(f"{field}: {mismatch}")


def restore_config(checkpoints: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config a checkpoint was saved with."""
  try:
    config = checkpoints.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  except (OSError, ValueError) as error:  # a config file cut short or gone
    raise UserError(f"checkpoint step {step} in {checkpoints.directory}: its config cannot be read ({error})") from None
  return ml_collections.ConfigDict(config)


def stored_param_paths(checkpoints: ocp.CheckpointManager, step: int) -> list[tuple[str, ...]]:
  """The path of every parameter stored at `step`, below "params"."""
  stored = jax.tree_util.tree_flatten_with_path(checkpoints.item_metadata(step)["state"].tree)[0]
  paths = [tuple(str(getattr(key, "key", key)) for key in path) for path, _ in stored]
  return [path[1:] for path in paths if path and path[0] == "params"]


