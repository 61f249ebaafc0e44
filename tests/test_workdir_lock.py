"""One run per workdir: the lock, its holder, and a killed holder's file."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from switchjax import validate
from switchjax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_second_holder_is_refused_naming_the_first(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  holder = json.loads((tmp_path / "run.lock").read_text())
  assert holder["pid"] == os.getpid()
  assert holder["host"] == socket.gethostname()
  before = (tmp_path / "run.lock").read_bytes()
  # Even from the same process: each run opens the file for itself.
  with pytest.raises(validate.ConfigError,
                     match=rf"--workdir {tmp_path} is in use by pid "
                     rf"{os.getpid()} on {socket.gethostname()} \(since "
                     r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC\): one run per "
                     "workdir"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert (tmp_path / "run.lock").read_bytes() == before  # untouched
  first.release()
  assert not (tmp_path / "run.lock").exists()
  first.release()  # twice is harmless
  again = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  again.release()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
  script = ("import os, signal, sys\n"
            "from switchjax import workdir_lock\n"
            "workdir_lock.WorkdirLock(sys.argv[1]).acquire()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  left = json.loads((tmp_path / "run.lock").read_text())
  assert left["pid"] != os.getpid()  # the dead run's file is still there
  lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  lock.release()
