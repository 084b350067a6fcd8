"""Orbax checkpoints of a run: async saves, verified restores onto any mesh, starting from another run, preemption.

A checkpoint holds four items: the TrainState, the data position, the config and metadata
(step, tokens seen, training seconds, lm version). Orbax writes each step into a temporary
directory and renames it when complete, so a checkpoint interrupted mid-write is never restored.

Reading checkpoints (digests, a step's config or parts of its state) is lm/checkpoints.py. Before
resuming, a damaged step (a file changed, cut short or gone) is set aside as damaged-STEP-TIME and
the step before it restored instead.
"""

import contextlib
import dataclasses
import json
import logging as logging_lib
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import lm
from lm import checkpoints as stored_lib
from lm import distributed
from lm import workdir as workdir_lib
from lm.config import ConfigError, UserError
from lm.train.state import TrainState

DAMAGED_PREFIX = "damaged-"  # a damaged step's folder, renamed so that Orbax no longer sees it


def directory(workdir: str) -> str:
  """Where a run's checkpoints live."""
  return workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR)


def manager(workdir: str, checkpoint: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """The run's CheckpointManager: keeps the newest `keep`, and every `keep_period`-th step forever."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint.keep,
      keep_period=checkpoint.keep_period or None,
      enable_async_checkpointing=checkpoint.async_save,
      cleanup_tmp_directories=True,  # leftovers of a save that was killed
  )
  # Handlers named up front, so the stored state's shapes can be read before restoring it.
  item_handlers = {"state": ocp.StandardCheckpointHandler(), **stored_lib.json_handlers()}
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


def _from_orbax(record: logging_lib.LogRecord) -> bool:
  """Whether a log record comes from Orbax, or from asyncio about one of Orbax's writers."""
  orbax = f"{os.sep}orbax{os.sep}"
  if orbax in record.pathname:
    return True
  if record.name != "asyncio":
    return False
  frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info and record.exc_info[2] else []
  return "orbax" in record.getMessage() or any(orbax in frame.filename for frame in frames)


class _NotFromOrbax(logging_lib.Filter):
  """Drops the errors Orbax logs, and asyncio's "... exception was never retrieved" for Orbax's writers."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno < logging_lib.ERROR or not _from_orbax(record)


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
      if not os.path.isdir(stored_lib.step_dir(self.checkpoints, self._step)):
        self.finish()  # raises the failure
    writing = self._digests is not None and self._digests.is_alive()
    if self._digests_due and not writing:
      self._digests_due = False
      self._digests = threading.Thread(target=stored_lib.write_digests, args=(self.checkpoints,), name="digests", daemon=True)
      self._digests.start()

  def finish(self) -> None:
    """Waits for the saves and the digests, and writes those still due."""
    with self._reporting_failures():
      self._wait()
    stored_lib.write_digests(self.checkpoints)

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
    # The run ends with this one line; the writers the failure left behind are reported by asyncio as they
    # are collected (futures "never retrieved", at any time until exit): not one of them is news.
    logging_lib.getLogger("asyncio").disabled = True
    on_disk = [step for step in self.checkpoints.all_steps() if os.path.isdir(stored_lib.step_dir(self.checkpoints, step))]
    earlier = [step for step in on_disk if self._step is None or step < self._step]
    kept = f"the checkpoint of step {max(earlier)} is intact" if earlier else "no earlier checkpoint was kept"
    message = " ".join(str(error).split())
    system_error = re.search(r"Failed to write [^:]*: ([^\[]+)", message)  # TensorStore's words for ENOSPC, EFBIG ...
    reason = system_error.group(1).strip() if system_error else message[:300]
    return UserError(
        f"saving step {self._step} in {self.checkpoints.directory} failed ({reason}); {kept}. Free space or fix the "
        "storage, then rerun the same command to resume"
    )


def _set_aside(checkpoints: ocp.CheckpointManager, step: int) -> str:
  """Renames a damaged step's folder out of Orbax's sight (kept for inspection); returns the new path."""
  damaged = os.path.join(str(checkpoints.directory), f"{DAMAGED_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  os.rename(stored_lib.step_dir(checkpoints, step), damaged)
  return damaged


def _damaged_folders(checkpoints: ocp.CheckpointManager) -> list[str]:
  return sorted(name for name in os.listdir(str(checkpoints.directory)) if name.startswith(DAMAGED_PREFIX))


def _newest_intact_step(checkpoints: ocp.CheckpointManager) -> int | None:
  """Process 0: the newest step whose files match their digests; damaged ones are set aside, with a warning."""
  for step in sorted(checkpoints.all_steps(), reverse=True):
    problem = stored_lib.damage(checkpoints, step)
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
    move = f"move {stored_lib.step_dir(checkpoints, step)} away to resume from step {max(earlier)}" if earlier else "start anew"
    raise UserError(
        f"checkpoint step {step} in {checkpoints.directory} cannot be read ({stored_lib.one_line(error)}). "
        f"If the cause is not this machine (memory, permissions, storage), the step is damaged: {move}"
    ) from None


def _restore(checkpoints: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> Restored:
  """Step `step`, after checking that it holds this model."""
  mismatch = stored_lib.first_mismatch(checkpoints, step, {"params": abstract_state.params})
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


def init_from(
    checkpoint: ml_collections.ConfigDict, state: TrainState, abstract_state: TrainState, new_heads: tuple[str, ...] = ()
) -> TrainState:
  """`state` with the params (and, if checkpoint.init_opt_state, the optimizer state) of another run's latest checkpoint.

  checkpoint.init_from names that run's workdir or its checkpoints directory. Parameters under the
  names `new_heads` (a classifier, say) that the other run lacks keep their fresh initialization.
  """
  other = stored_lib.read_only_manager(checkpoint.init_from)
  step = other.latest_step()
  stored_names = {path[0] for path in stored_lib.stored_param_paths(other, step)} if step is not None else set()
  fresh = [name for name in new_heads if name in abstract_state.params and name not in stored_names]
  if fresh and checkpoint.init_opt_state:
    raise ConfigError(f"checkpoint.init_opt_state: {checkpoint.init_from} has no optimizer state for {', '.join(fresh)}; set it False")
  parts = ("params", "opt_state") if checkpoint.init_opt_state else ("params",)
  target = {part: getattr(abstract_state, part) for part in parts}
  target["params"] = {name: value for name, value in target["params"].items() if name not in fresh}
  restored = stored_lib.restore_parts(other, None, target, "checkpoint.init_from")
  restored["params"] = {**state.params, **restored["params"]}
  kept_fresh = f"; {', '.join(fresh)} newly initialized" if fresh else ""
  distributed.log(f"Initialized {' and '.join(parts)} from {other.directory} (step {step}){kept_fresh}")
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
