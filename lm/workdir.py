"""A run's workdir: one writer at a time, and the names of what it holds.

The lock is a file (WORKDIR/lock) naming its holder: host, process id, command, start time. It
appears whole or not at all (written aside, then hard-linked into place), its holder refreshes it
every HEARTBEAT_SECONDS (and puts it back if it goes missing), and removes it at exit. A lock whose
holder is gone is taken over: on the same host when that process no longer runs (kill -9
included), elsewhere when its heartbeat is older than STALE_SECONDS. Two processes taking over
the same stale lock do it one after the other (an flock), so only one gets it.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time

from lm.config import UserError, absolute_path

CONFIG_FILE = "config.json"  # the run's resolved config
CHECKPOINTS_DIR = "checkpoints"  # Orbax checkpoints, one folder per step (lm/checkpoints.py)
METRICS_FILE = "metrics.jsonl"  # one row per logged step
TENSORBOARD_DIR = "tensorboard"  # the same metrics, and profiles
DATASET_FILE = "dataset.json"  # where the run's tokenized data is, so that evaluation reads it instead of rebuilding
# A copy of the run's tokenizer, named by its kind: sentencepiece, or Hugging Face's (with a tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
LOCK_FILE = "lock"
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 180.0  # a holder on another host that has not refreshed the lock for this long is gone
WAIT_SECONDS = 5.0  # between looks at a lock that is waited for


def tokenizer_path(workdir: str) -> str | None:
  """The run's copy of its tokenizer (WORKDIR/tokenizer.model or WORKDIR/tokenizer.json), None if it has none."""
  for name in TOKENIZER_FILES:
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      return path
  return None


def path(workdir: str, name: str) -> str:
  """WORKDIR/name, for the names above."""
  return os.path.join(absolute_path(workdir), name)


def record_dataset(workdir: str, builder) -> None:
  """Notes the folder of the run's tokenized data (a TFDS builder's) in WORKDIR/dataset.json."""
  partial = f"{path(workdir, DATASET_FILE)}.partial-{os.getpid()}"
  with open(partial, "w") as f:
    json.dump({"data_dir": str(builder.data_dir)}, f)
  os.replace(partial, path(workdir, DATASET_FILE))


def recorded_dataset(workdir: str):
  """The run's tokenized data, read from the folder noted in WORKDIR/dataset.json; None if that is gone."""
  try:
    with open(path(workdir, DATASET_FILE)) as f:
      data_dir = json.load(f)["data_dir"]
  except (OSError, ValueError, KeyError):
    return None
  if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
    return None
  import tensorflow_datasets as tfds  # only what reads data needs it

  return tfds.builder_from_directory(data_dir)


def _process_start(pid: int) -> str | None:
  """When process `pid` started (Linux), to tell it from a later process that reuses its id; None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot
  except (OSError, IndexError):
    return None


def _is_running(pid: int, start: str | None) -> bool:
  """Whether the process `pid` that started at `start` still runs on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: it runs
    pass
  return start is None or _process_start(pid) in (None, start)


class Lock:
  """Holds FOLDER/lock (or FOLDER/`file_name`) for one writer: `with Lock(workdir, "training"): ...`.

  A second writer gets a UserError naming the holder, or with `wait` waits for it to finish.
  `check()` raises if, while held, the lock was lost (the folder deleted and another writer there).
  Only one process of a multi-host run takes it.
  """

  def __init__(self, folder: str, purpose: str, wait: bool = False, file_name: str = LOCK_FILE):
    self.path = os.path.join(absolute_path(folder), file_name)
    self.wait = wait
    self.holder = {
        "purpose": purpose,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "command": " ".join([os.path.basename(sys.orig_argv[0]), *sys.orig_argv[1:]]),  # python -m lm.train ...
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    self.lost_to: dict | None = None  # the writer that holds the lock now, if not this process
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self) -> "Lock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while not self._create():
      holder, age = self._read()
      if self._stale(holder, age):
        self._take_over(holder, age)
      elif self.wait:
        print(f"Waiting for the {self._describe(holder)} to finish with {os.path.dirname(self.path)}", flush=True)
        time.sleep(WAIT_SECONDS)
      else:
        raise UserError(
            f"{os.path.dirname(self.path)} is in use: {self._describe(holder)}. Wait for it to end or stop it, or use "
            f"another --workdir (if that process is gone for good, delete {self.path})"
        )
    self._heartbeat = threading.Thread(target=self._refresh, name="workdir-lock", daemon=True)
    self._heartbeat.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    if self._heartbeat:
      self._heartbeat.join()
    if self._is_mine(self._read()[0]):
      os.remove(self.path)

  def check(self) -> None:
    """Raises a UserError if another writer holds the lock now (cheap: call it often)."""
    if self.lost_to:
      raise UserError(
          f"{os.path.dirname(self.path)} was deleted while in use, and a {self._describe(self.lost_to)} writes there "
          "now; stopping so as to leave it alone"
      )

  def _create(self) -> bool:
    """Creates the lock file naming this process, whole; False if it exists."""
    partial = f"{self.path}.{self.holder['host']}.{self.holder['pid']}"
    with open(partial, "w") as f:
      json.dump(self.holder, f)
    try:
      os.link(partial, self.path)  # fails if it exists; never shows a file half written
      return True
    except FileExistsError:
      return False
    except OSError:  # a filesystem without hard links (some FUSE mounts): create it in place
      return self._create_in_place()
    finally:
      os.remove(partial)

  def _create_in_place(self) -> bool:
    try:
      descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(descriptor, "w") as f:
      json.dump(self.holder, f)
    return True

  def _take_over(self, holder: dict | None, age: float) -> None:
    """Removes a stale lock, unless another process did so (and took it) first."""
    with open(self.path + ".takeover", "a") as guard:
      fcntl.flock(guard, fcntl.LOCK_EX)  # one process at a time between reading the holder and removing it
      current, current_age = self._read()
      if current == holder and self._stale(current, current_age):
        print(f"Warning: taking over the lock of a {self._describe(holder)}, which has ended", flush=True)
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)

  def _read(self) -> tuple[dict | None, float]:
    """The holder written in the lock file (None if unreadable) and seconds since its last heartbeat."""
    try:
      age = time.time() - os.path.getmtime(self.path)
      with open(self.path) as f:
        return json.load(f), age
    except FileNotFoundError:
      return None, 0.0
    except (OSError, ValueError):  # damaged (written by hand, or by an older lm): judge it by its age alone
      return None, age

  def _stale(self, holder: dict | None, age: float) -> bool:
    if holder and holder.get("host") == self.holder["host"] and isinstance(holder.get("pid"), int):
      return not _is_running(holder["pid"], holder.get("process_start"))
    return age > STALE_SECONDS

  def _is_mine(self, holder: dict | None) -> bool:
    return bool(holder) and all(holder.get(key) == self.holder[key] for key in ("host", "pid", "since"))

  @staticmethod
  def _describe(holder: dict | None) -> str:
    if not holder:
      return "process whose lock file is unreadable"
    return (
        f"{holder.get('purpose', 'writing')} process {holder.get('pid')} on {holder.get('host')} since "
        f"{holder.get('since')} ({holder.get('command')})"
    )

  def _refresh(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      holder, _ = self._read()
      if self._is_mine(holder):
        with contextlib.suppress(OSError):
          os.utime(self.path)
        continue
      if holder is None:  # deleted: put it back, unless another writer has come meanwhile
        with contextlib.suppress(OSError):
          os.makedirs(os.path.dirname(self.path), exist_ok=True)
          if self._create():
            continue
        holder, _ = self._read()
      if holder and not self._is_mine(holder):
        self.lost_to = holder
        return
