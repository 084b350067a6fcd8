"""A run's workdir: one absolute path, one writer at a time, and the names of what it holds.

The lock is the file WORKDIR/lock, naming its holder (host, process id, command, start time). It is
created atomically, refreshed by its holder every HEARTBEAT_SECONDS, and removed at exit. A lock
whose holder is gone is taken over: on the same host when that process no longer runs (kill -9
included), elsewhere when its heartbeat is older than STALE_SECONDS.
"""

import json
import os
import socket
import sys
import threading
import time

from lm.config import UserError, absolute_path

CONFIG_FILE = "config.json"  # the run's resolved config
TOKENIZER_FILE = "tokenizer.model"  # a copy of the run's tokenizer
LOCK_FILE = "lock"
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 180.0  # a holder on another host that has not refreshed the lock for this long is gone


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
  """Holds WORKDIR/lock for one writer (a trainer, an import): `with Lock(workdir, "training"): ...`.

  A second writer gets a UserError naming the holder. Only one process of a multi-host run takes it.
  """

  def __init__(self, workdir: str, purpose: str):
    self.path = os.path.join(absolute_path(workdir), LOCK_FILE)
    self.holder = {
        "purpose": purpose,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "command": " ".join([os.path.basename(sys.orig_argv[0]), *sys.orig_argv[1:]]),  # python -m lm.train ...
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self) -> "Lock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while not self._create():
      holder, age = self._read()
      if not self._stale(holder, age):
        raise UserError(
            f"{os.path.dirname(self.path)} is in use: {self._describe(holder)}. Wait for it to end or stop it, or use "
            f"another --workdir (if that process is gone for good, delete {self.path})"
        )
      print(f"Warning: taking over the lock of a {self._describe(holder)}, which has ended", flush=True)
      try:
        os.remove(self.path)
      except FileNotFoundError:  # another process took it over first; try again
        pass
    self._heartbeat = threading.Thread(target=self._refresh, name="workdir-lock", daemon=True)
    self._heartbeat.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    if self._heartbeat:
      self._heartbeat.join()
    holder, _ = self._read()
    if holder and holder.get("pid") == self.holder["pid"] and holder.get("host") == self.holder["host"]:
      os.remove(self.path)

  def _create(self) -> bool:
    """Creates the lock file naming this process; False if it exists."""
    try:
      descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(descriptor, "w") as f:
      json.dump(self.holder, f)
    return True

  def _read(self) -> tuple[dict | None, float]:
    """The holder written in the lock file (None if unreadable) and seconds since its last heartbeat."""
    try:
      age = time.time() - os.path.getmtime(self.path)
      with open(self.path) as f:
        return json.load(f), age
    except FileNotFoundError:
      return None, 0.0
    except (OSError, ValueError):  # being written right now, or damaged: judge it by its age alone
      return None, age

  def _stale(self, holder: dict | None, age: float) -> bool:
    if holder and holder.get("host") == self.holder["host"] and isinstance(holder.get("pid"), int):
      return not _is_running(holder["pid"], holder.get("process_start"))
    return age > STALE_SECONDS

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
      try:
        os.utime(self.path)
      except OSError:  # the file is gone (deleted by hand): nothing to refresh
        pass
