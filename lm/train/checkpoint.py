"""Orbax checkpoints of a run: async saves, restoring onto any mesh, starting from another run, preemption.

A checkpoint holds four items: the TrainState, the data position, the config and metadata
(step, tokens seen, training seconds, lm version). Orbax writes each step into a temporary
directory and renames it when complete, so a checkpoint interrupted mid-write is never restored.
"""

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

import lm
from lm import distributed
from lm.config import ConfigError, UserError
from lm.train.state import TrainState

ITEMS = ("state", "data", "config", "metadata")


def _json_handlers() -> dict[str, ocp.JsonCheckpointHandler]:
  return {name: ocp.JsonCheckpointHandler() for name in ITEMS if name != "state"}


def directory(workdir: str) -> str:
  """Where a run's checkpoints live."""
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")


def manager(workdir: str, checkpoint: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """The run's CheckpointManager: keeps the newest `keep`, and every `keep_period`-th step forever."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint.keep,
      keep_period=checkpoint.keep_period or None,
      enable_async_checkpointing=checkpoint.async_save,
      cleanup_tmp_directories=True,  # leftovers of a save that was killed
  )
  # Handlers named up front, so the stored state's shapes can be read before restoring it.
  item_handlers = {"state": ocp.StandardCheckpointHandler(), **_json_handlers()}
  return ocp.CheckpointManager(directory(workdir), options=options, item_handlers=item_handlers)


def save(
    checkpoints: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    data: dict[str, Any],
    config: ml_collections.ConfigDict,
    metadata: dict[str, Any],
) -> None:
  """Starts writing a checkpoint of `step`; returns once the state is copied off the devices."""
  checkpoints.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data),
          config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
          metadata=ocp.args.JsonSave({**metadata, "step": step, "lm_version": lm.__version__, "saved_at": time.time()}),
      ),
      force=True,  # the loop decides when to save
  )


@dataclasses.dataclass
class Restored:
  """A checkpoint read back: the state on the current mesh, and the JSON items."""

  step: int
  state: TrainState
  data: dict[str, Any]
  metadata: dict[str, Any]


def restore_latest(checkpoints: ocp.CheckpointManager, abstract_state: TrainState) -> Restored | None:
  """The newest complete checkpoint, read directly into `abstract_state`'s shardings; None if there is none."""
  step = checkpoints.latest_step()
  if step is None:
    return None
  mismatch = _first_mismatch(checkpoints, step, {"params": abstract_state.params})
  if mismatch:
    raise UserError(
        f"{checkpoints.directory} holds a checkpoint of another model: {mismatch}. Resume with the run's own "
        "config (--config=configs/from_run.py:WORKDIR), use a new --workdir, or start from it with checkpoint.init_from"
    )
  restored = checkpoints.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
          metadata=ocp.args.JsonRestore(),
      ),
  )
  return Restored(step, restored["state"], restored["data"], restored["metadata"])


def read_only_manager(path: str) -> ocp.CheckpointManager:
  """A manager for reading the checkpoints of a run's workdir (or of its checkpoints directory)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints at {path}")
  return ocp.CheckpointManager(
      path,
      options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), **_json_handlers()},  # the state handler reads subtrees
  )


def _first_mismatch(checkpoints: ocp.CheckpointManager, step: int, target: dict[str, Any]) -> str | None:
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
  mismatch = _first_mismatch(checkpoints, step, target)
  if mismatch:
    raise ConfigError(f"{field}: {mismatch}")
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  state_args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
  return checkpoints.restore(step, args=ocp.args.Composite(state=state_args))["state"]


def restore_config(checkpoints: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config a checkpoint was saved with."""
  return ml_collections.ConfigDict(checkpoints.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


def init_from(checkpoint: ml_collections.ConfigDict, state: TrainState, abstract_state: TrainState) -> TrainState:
  """`state` with the params (and, if checkpoint.init_opt_state, the optimizer state) of another run's latest checkpoint.

  checkpoint.init_from names that run's workdir or its checkpoints directory.
  """
  other = read_only_manager(checkpoint.init_from)
  parts = ("params", "opt_state") if checkpoint.init_opt_state else ("params",)
  target = {part: getattr(abstract_state, part) for part in parts}
  restored = restore_parts(other, None, target, "checkpoint.init_from")
  distributed.log(f"Initialized {' and '.join(parts)} from {other.directory} (step {other.latest_step()})")
  return state.replace(**restored)


class PreemptionWatcher:
  """Notices SIGTERM / SIGINT (one process) or JAX's preemption sync point (several processes).

  A signal only sets a flag: the loop finishes the step it is on, saves, and exits. A second
  SIGINT (Ctrl-C) stops at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, checkpoints: ocp.CheckpointManager):
    self._checkpoints = checkpoints
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self) -> "PreemptionWatcher":
    # Several processes learn of a preemption through JAX's coordination service instead, which
    # makes all of them stop at the same step.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)

  def _handle(self, number: int, frame) -> None:
    del frame
    self.signal_name = signal.Signals(number).name
    signal.signal(number, self._previous[number])  # a second signal acts at once

  def requested(self, step: int) -> bool:
    """Whether to save now and stop; on several processes, all of them answer alike at `step`."""
    if jax.process_count() > 1 and self._checkpoints.reached_preemption(step):
      self.signal_name = "preemption notice"
    return self.signal_name is not None
