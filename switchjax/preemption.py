"""Stopping a run at a step boundary on SIGTERM or SIGINT (preemption).

The training loop asks `PreemptionGuard.should_stop(step)` after every step;
once it says yes, the loop saves a checkpoint of that step and returns, so
the same command resumes exactly there. How processes agree on the step:

- one process: a signal handler sets a flag, read after the next step;
- several processes with JAX's preemption service (jax.distributed, on by
  default): JAX catches SIGTERM on any process and
  `multihost_utils.reached_preemption_sync_point(step)` turns true on every
  process at the same step (the largest step any process had reached, plus
  one). SIGINT is re-sent as SIGTERM so it takes the same path;
- several processes without that service: every step all-reduces the
  processes' flags in a tiny computation whose result is read one step later,
  so the host never waits on it and all processes read the same values.

A second SIGINT while the guard waits for the step boundary interrupts at
once (KeyboardInterrupt): Ctrl-C twice aborts without saving.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

MODES = ("local", "jax", "allreduce")


def _default_mode() -> str:
  if jax.process_count() == 1:
    return "local"
  if jax.config.jax_enable_preemption_service:
    return "jax"
  return "allreduce"


class PreemptionGuard:
  """Context manager: installs the signal handlers, answers `should_stop`.

  Outside the main thread (where Python cannot install signal handlers) the
  guard installs nothing and only the multi-process JAX path can stop a run.
  """

  def __init__(self, mode: Optional[str] = None):
    self.mode = mode or _default_mode()
    if self.mode not in MODES:
      raise ValueError(f"PreemptionGuard mode must be one of {MODES}, got "
                       f"{self.mode!r}")
    self.signal_name: Optional[str] = None  # the signal this process got
    self._previous = {}
    self._pending = None  # allreduce mode: last step's reduced flag
    self._reduce = None

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      return self
    # In 'jax' mode JAX's own handler owns SIGTERM; only SIGINT is ours.
    signums = ((signal.SIGINT,) if self.mode == "jax"
               else (signal.SIGTERM, signal.SIGINT))
    for signum in signums:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.signal_name is not None:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, save nothing
    self.signal_name = signal.Signals(signum).name
    if self.mode == "jax" and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells the others

  @property
  def reason(self) -> str:
    """Why the run stopped: the signal this process got, or (JAX catches
    SIGTERM itself; other processes get none) a notice."""
    if self.signal_name:
      return self.signal_name
    return "a preemption notice (SIGTERM)"

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once any process got a signal.

    Call it once per step, with increasing steps, on every process.
    """
    if self.mode == "local":
      return self.signal_name is not None
    if self.mode == "jax":
      return multihost_utils.reached_preemption_sync_point(step)
    return self._allreduce(self.signal_name is not None)

  def _allreduce(self, flag: bool) -> bool:
    if self._reduce is None:
      devices = np.array(jax.devices())
      mesh = jax.sharding.Mesh(devices, ("p",))
      self._sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("p"))
      self._reduce = jax.jit(
          jnp.max, out_shardings=jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec()))
    # One step late: the previous step's reduction is done (or nearly) by now.
    stop = (self._pending is not None
            and bool(np.asarray(self._pending.addressable_data(0))))
    local = np.full((jax.local_device_count(),), int(flag), np.int32)
    self._pending = self._reduce(
        jax.make_array_from_process_local_data(self._sharding, local))
    return stop
