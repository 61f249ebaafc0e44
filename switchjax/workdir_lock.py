"""One run per workdir: a lock the run holds on DIR/run.lock while it lives.

The lock is an flock(2) on DIR/run.lock, which also records the holder
(host, pid, start time). A second run on the same workdir (a second
terminal, a sweep and a hand run) finds it taken and is refused with one
line naming the holder, before it writes anything. The kernel drops an
flock when its process ends, however it ends (kill -9 too), so the file a
killed run leaves behind is taken over by the next run: its holder is gone.
Multi-process runs take it once, on process 0; the others learn the outcome.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Optional

from switchjax import validate

LOCK_FILE = "run.lock"


class WorkdirInUse(validate.ConfigError):
  """Another live run holds the workdir."""


def _holder_text(raw: bytes) -> str:
  try:
    h = json.loads(raw)
    return f"pid {h['pid']} on {h['host']} (since {h['since']})"
  except (ValueError, KeyError, TypeError):
    return "another run"  # it has the lock but has not written itself yet


class WorkdirLock:
  """Held from `acquire` to `release`; refuses a workdir another run holds."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _holder_text(os.read(fd, 4096))
        os.close(fd)
        raise WorkdirInUse(
            f"--workdir {self.workdir} is in use by {holder}: one run per "
            f"workdir (wait for it, stop it, or use another workdir)"
        ) from None
      # A holder that just ended unlinked the file we opened: lock the new one.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    since = datetime.datetime.now(datetime.timezone.utc)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "since": since.strftime("%Y-%m-%d %H:%M:%S UTC")}).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while locked: a waiter sees a stale inode
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def acquire_for_run(workdir: str) -> Optional[WorkdirLock]:
  """Process 0 takes workdir's lock; every process raises WorkdirInUse if
  it is held. Returns the lock on process 0, None on the others."""
  import jax  # pylint: disable=g-import-not-at-top
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirInUse as e:
      error = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    held = int(multihost_utils.broadcast_one_to_all(np.int32(bool(error))))
    if held and not error:
      error = (f"--workdir {workdir} is in use by another run (process 0 "
               "found it locked): one run per workdir")
  if error:
    raise WorkdirInUse(error)
  return lock
