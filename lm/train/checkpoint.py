"""Orbax checkpoints of a run: async saves, verified restores onto any mesh, starting from another run, preemption.

A checkpoint holds four items: the TrainState, the data position, the config and metadata
(step, tokens seen, training seconds, lm version). Orbax writes each step into a temporary
directory and renames it when complete, so a checkpoint interrupted mid-write is never restored.

Once a step is complete, the SHA-256 of each of its files goes into its DIGESTS_FILE; a restore
checks them first. A damaged step (a file changed, cut short or gone) is set aside as
damaged-STEP-TIME and the step before it restored instead.
"""

import contextlib
import concurrent.futures
import dataclasses
import json
import logging as logging_lib
import os
import re
import signal
import sys
import threading
import time
import warnings
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import lm
from lm import distributed
from lm.config import ConfigError, UserError, absolute_path
from lm.train.state import TrainState

ITEMS = ("state", "data", "config", "metadata")
DIGESTS_FILE = "lm_digests.json"
DAMAGED_PREFIX = "damaged-"  # a damaged step's folder, renamed so that Orbax no longer sees it


def _json_handlers() -> dict[str, ocp.JsonCheckpointHandler]:
  return {name: ocp.JsonCheckpointHandler() for name in ITEMS if name != "state"}


def directory(workdir: str) -> str:
  """Where a run's checkpoints live."""
  return os.path.join(absolute_path(workdir), "checkpoints")


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


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())[:200]


def _step_dir(checkpoints: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(checkpoints.directory), str(step))


def _file_digest(path: str) -> str:
  """"SIZE:CRC32" of a file, read in large blocks (zlib releases the GIL, so files hash in parallel)."""
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(1 << 24):
      crc = zlib.crc32(block, crc)
  return f"{os.path.getsize(path)}:{crc:08x}"


def _file_digests(step_dir: str) -> dict[str, str]:
  """The digest of every file of a step folder (its own digests file aside), by path inside it."""
  paths = []
  for directory, _, files in os.walk(step_dir):
    paths += [os.path.join(directory, name) for name in files if not name.startswith(DIGESTS_FILE)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    digests = pool.map(_file_digest, paths)
  return {os.path.relpath(path, step_dir): digest for path, digest in sorted(zip(paths, digests))}


def write_digests(checkpoints: ocp.CheckpointManager) -> None:
  """Writes the digests of every complete step that has none yet (process 0; call when no save is running).

  A step whose digests cannot be written (a full disk, say) is left without: it is then checked by
  reading it, as a step saved by an older lm is.
  """
  if jax.process_index() != 0:
    return
  for step in checkpoints.all_steps():
    path = os.path.join(_step_dir(checkpoints, step), DIGESTS_FILE)
    if os.path.exists(path):
      continue
    partial = f"{path}.partial-{os.getpid()}"
    try:
      digests = _file_digests(_step_dir(checkpoints, step))
      with open(partial, "w") as f:
        json.dump(digests, f)
      os.replace(partial, path)
    except OSError as error:  # the step deleted meanwhile (by hand), or no room for the file
      if os.path.exists(partial):
        os.remove(partial)
      if not isinstance(error, FileNotFoundError):
        distributed.log(f"Warning: no digests for checkpoint step {step} ({error}); it will be checked by reading it")


class _NotFromOrbax(logging_lib.Filter):
  """Drops the errors Orbax logs, and asyncio's "Task exception was never retrieved" for Orbax's writers."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    if record.levelno < logging_lib.ERROR:
      return True
    orbax = f"{os.sep}orbax{os.sep}"
    return orbax not in record.pathname and not (record.name == "asyncio" and orbax in record.getMessage())


def _quiet_orbax_errors() -> None:
  """Keeps the tracebacks of a failed save off the terminal (once per process): those Orbax logs from its
  background threads, and those of its writers that find their event loop closed after the failure."""
  handler = logging.get_absl_handler()
  if any(isinstance(f, _NotFromOrbax) for f in handler.filters):
    return
  handler.addFilter(_NotFromOrbax())
  logging_lib.getLogger("asyncio").addFilter(_NotFromOrbax())  # whichever handler prints its records
  report = sys.unraisablehook

  def unraisable(unraisable) -> None:
    closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
    orbax_writer = f"{os.sep}orbax{os.sep}" in getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
    if not (closed_loop or orbax_writer):
      report(unraisable)

  sys.unraisablehook = unraisable
  # A writer that a failed save leaves behind is never awaited; Python warns of each at exit.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


class Saver:
  """Saves checkpoints in the background, records their digests between saves (so hashing a large
  checkpoint never stalls training), and turns a failed save (a full disk, storage gone) into one
  line as soon as it is noticed."""

  def __init__(self, checkpoints: ocp.CheckpointManager):
    self.checkpoints = checkpoints
    _quiet_orbax_errors()  # the Saver reports a failed save itself, in one line
    self._digests: threading.Thread | None = None
    self._digests_due = True  # steps saved before this run may lack digests too
    self._step: int | None = None  # the step of the latest save
    self._checked = True  # whether the latest save is known to have worked

  def save(self, step: int, *args, **kwargs) -> None:
    """`save(checkpoints, step, ...)`, once the previous save and the digests being written are done (the
    save may delete old steps)."""
    with self._reporting_failures():
      self._wait()  # a previous save that failed is reported here, under its own step
      self._step, self._checked = step, False
      save(self.checkpoints, step, *args, **kwargs)
    self._digests_due = True

  def after_step(self) -> None:
    """Cheap, after every step: reports a save that has failed; starts writing digests if they are due."""
    if self.checkpoints.is_saving_in_progress():
      return
    if not self._checked:  # the latest save has ended: it worked if its step folder is there
      self._checked = True
      if not os.path.isdir(_step_dir(self.checkpoints, self._step)):
        self.finish()  # raises the failure
    writing = self._digests is not None and self._digests.is_alive()
    if self._digests_due and not writing:
      self._digests_due = False
      self._digests = threading.Thread(target=write_digests, args=(self.checkpoints,), name="digests", daemon=True)
      self._digests.start()

  def finish(self) -> None:
    """Waits for the saves and the digests, and writes those still due."""
    with self._reporting_failures():
      self._wait()
    write_digests(self.checkpoints)

  def _wait(self) -> None:
    self.checkpoints.wait_until_finished()
    if self._digests:
      self._digests.join()

  @contextlib.contextmanager
  def _reporting_failures(self):
    """A failed save becomes one UserError."""
    try:
      yield
    except Exception as error:
      raise self._failed(error) from None

  def _failed(self, error: Exception) -> UserError:
    on_disk = [step for step in self.checkpoints.all_steps() if os.path.isdir(_step_dir(self.checkpoints, step))]
    earlier = [step for step in on_disk if self._step is None or step < self._step]
    kept = f"the checkpoint of step {max(earlier)} is intact" if earlier else "no earlier checkpoint was kept"
    message = " ".join(str(error).split())
    system_error = re.search(r"Failed to write [^:]*: ([^\[]+)", message)  # TensorStore's words for ENOSPC, EFBIG ...
    reason = system_error.group(1).strip() if system_error else message[:300]
    return UserError(
        f"saving step {self._step} in {self.checkpoints.directory} failed ({reason}); {kept}. Free space or fix the "
        "storage, then rerun the same command to resume"
    )


def damage(checkpoints: ocp.CheckpointManager, step: int) -> str | None:
  """What is wrong with a step's files compared with its digests; None when they match (or it has none)."""
  step_dir = _step_dir(checkpoints, step)
  try:
    with open(os.path.join(step_dir, DIGESTS_FILE)) as f:
      expected = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return f"its {DIGESTS_FILE} is unreadable"
  found = _file_digests(step_dir)
  for name, digest in sorted(expected.items()):
    if name not in found:
      return f"{name} is missing"
    if found[name] != digest:
      return f"{name} has changed since it was saved"
  return None


def _set_aside(checkpoints: ocp.CheckpointManager, step: int) -> str:
  """Renames a damaged step's folder out of Orbax's sight (kept for inspection); returns the new path."""
  damaged = os.path.join(str(checkpoints.directory), f"{DAMAGED_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  os.rename(_step_dir(checkpoints, step), damaged)
  return damaged


def _damaged_folders(checkpoints: ocp.CheckpointManager) -> list[str]:
  return sorted(name for name in os.listdir(str(checkpoints.directory)) if name.startswith(DAMAGED_PREFIX))


def _newest_intact_step(checkpoints: ocp.CheckpointManager) -> int | None:
  """Process 0: the newest step whose files match their digests; damaged ones are set aside, with a warning."""
  for step in sorted(checkpoints.all_steps(), reverse=True):
    problem = damage(checkpoints, step)
    if problem is None:
      return step
    moved = _set_aside(checkpoints, step)
    distributed.log(f"Warning: checkpoint step {step} is damaged ({problem}); it is set aside as {moved}")
  return None


@dataclasses.dataclass
class Restored:
  """A checkpoint read back: the state on the current mesh, and the JSON items."""

  step: int
  state: TrainState
  data: dict[str, Any]
  metadata: dict[str, Any]


def restore_latest(checkpoints: ocp.CheckpointManager, abstract_state: TrainState) -> Restored | None:
  """The newest intact checkpoint, read directly into `abstract_state`'s shardings; None if there is none.

  Process 0 checks the digests and sets damaged steps aside (every process then restores the step
  it chose). A step that matches its digests, or has none, but cannot be read is a UserError that
  names it: the cause may be elsewhere (memory, permissions, storage), so it is not set aside.
  """
  step = _newest_intact_step(checkpoints) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    step = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
    step = None if step < 0 else step
  checkpoints.reload()
  if step is None:
    damaged = _damaged_folders(checkpoints)
    if damaged:  # starting over here would mix a new run into the old one's files
      raise UserError(
          f"{checkpoints.directory} holds only damaged checkpoints ({', '.join(damaged)}): start a new --workdir, or "
          "move the checkpoints folder away to start over in this one"
      )
    return None
  try:
    return _restore(checkpoints, step, abstract_state)
  except UserError:
    raise
  except Exception as error:  # Orbax and TensorStore raise many types, for files cut short and for full memory alike
    earlier = [other for other in checkpoints.all_steps() if other < step]
    move = f"move {_step_dir(checkpoints, step)} away to resume from step {max(earlier)}" if earlier else "start anew"
    raise UserError(
        f"checkpoint step {step} in {checkpoints.directory} cannot be read ({_one_line(error)}). "
        f"If the cause is not this machine (memory, permissions, storage), the step is damaged: {move}"
    ) from None


def _restore(checkpoints: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> Restored:
  """Step `step`, after checking that it holds this model."""
  mismatch = _first_mismatch(checkpoints, step, {"params": abstract_state.params})
  if mismatch:
    raise UserError(
        f"{checkpoints.directory} holds a checkpoint of another model: {mismatch}. Resume with the run's own "
        "config (--config=configs/from_run.py:WORKDIR), use a new --workdir, or start from it with checkpoint.init_from"
    )
  try:
    restored = checkpoints.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            metadata=ocp.args.JsonRestore(),
        ),
    )
  except ValueError as error:
    if "tree structures do not match" not in str(error):
      raise
    raise UserError(
        f"{checkpoints.directory} holds the optimizer state of another optimizer (optimizer.grad_clip_norm turned on "
        "or off?): resume with the run's own optimizer settings, or start a new --workdir from it with checkpoint.init_from"
    ) from None
  return Restored(step, restored["state"], restored["data"], restored["metadata"])


def check_intact(checkpoints: ocp.CheckpointManager, step: int) -> None:
  """A UserError naming step `step` and the steps kept, if its files do not match their digests."""
  problem = damage(checkpoints, step)
  if problem:
    others = [other for other in checkpoints.all_steps() if other != step]
    raise UserError(f"checkpoint step {step} in {checkpoints.directory} is damaged ({problem}); kept steps: {others}")


def read_only_manager(path: str) -> ocp.CheckpointManager:
  """A manager for reading the checkpoints of a run's workdir (or of its checkpoints directory)."""
  path = absolute_path(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints at {path}")
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns that the directory is read only, which is what is asked
  try:
    return ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), **_json_handlers()},  # the state handler reads subtrees
    )
  finally:
    logging.set_verbosity(verbosity)


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
  check_intact(checkpoints, step)
  try:
    mismatch = _first_mismatch(checkpoints, step, target)
    if not mismatch:
      restore_args = ocp.checkpoint_utils.construct_restore_args(target)
      state_args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
      return checkpoints.restore(step, args=ocp.args.Composite(state=state_args))["state"]
  except Exception as error:  # Orbax and TensorStore raise many types for files cut short or gone
    raise UserError(f"checkpoint step {step} in {checkpoints.directory} cannot be read ({_one_line(error)})") from None
  raise ConfigError(f"{field}: {mismatch}")


def restore_config(checkpoints: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config a checkpoint was saved with."""
  try:
    config = checkpoints.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  except (OSError, ValueError) as error:  # a config file cut short or gone
    raise UserError(f"checkpoint step {step} in {checkpoints.directory}: its config cannot be read ({error})") from None
  return ml_collections.ConfigDict(config)


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
