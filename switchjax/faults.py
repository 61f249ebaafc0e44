"""Faults during a run: non-finite steps and failed writes, one line each.

Every error here names the step, what went wrong and the last good
checkpoint, so the line alone says how to go on; main.py prints it and exits
1. Bad configs are refused earlier, by validate.py (ConfigError).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax


# train.nan_policy: what a non-finite step does. Both leave the step's params
# and optimizer state as they were (train.py); 'stop' then ends the run
# (FiniteWatch), 'skip' goes on and counts the step in skipped_steps.
NAN_POLICIES = ("stop", "skip")


class RunError(RuntimeError):
  """A run stopped by a fault; its message is one line with a way on."""


class NonFiniteError(RunError, FloatingPointError):
  """NaN or Inf in a step's loss, gradients or updated parameters."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """The gist of an exception on one line (last non-empty line, trimmed)."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  text = lines[-1] if lines else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def last_checkpoint_text(step: Optional[int], directory: str) -> str:
  if step is None:
    return "last good checkpoint: none yet"
  return f"last good checkpoint: step {step} in {directory}"


def io_failed(error: OSError, step: int, last: str) -> RunError:
  """A failed read or write (disk full, unwritable path) as one line."""
  what = error.strerror or one_line(error)
  where = f": {error.filename}" if error.filename else ""
  return RunError(
      f"{what}{where} at step {step}; {last}; nothing already saved was "
      "lost: fix the cause (free space, permissions) and run the same "
      "command again to resume")


# Scalars of a step's metrics that name what went non-finite, in the order
# that explains it best: the loss, then its gradients, then the update.
QUANTITIES = (("total_loss", "loss"), ("grad_norm", "gradient norm"),
              ("param_norm", "parameter norm after the update"))


class FiniteWatch:
  """Stops a nan_policy='stop' run at its first non-finite step.

  The train step returns a boolean `finite` with its metrics. Reading it
  every step at once would make the host wait for the device every step, so
  `push` reads the previous step's flag (finished, or nearly, while this step
  runs) and `check` reads the newest one now: the loop calls it before it
  logs, evaluates or saves, so no non-finite value is logged, evaluated or
  saved, and a run stops at most one step after the fault, naming it.
  """

  def __init__(self, policy: str, last_checkpoint: Callable[[], str]):
    assert policy in NAN_POLICIES, policy
    self.enabled = policy == "stop"
    self._last_checkpoint = last_checkpoint
    self._pending = None

  def push(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self.check()
    self._pending = (step, metrics)

  def check(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    if bool(jax.device_get(metrics["finite"])):
      return
    values = jax.device_get({k: metrics[k] for k, _ in QUANTITIES})
    bad = [f"{name} is {float(values[k])}" for k, name in QUANTITIES
           if not math.isfinite(float(values[k]))] or ["a value is not finite"]
    raise NonFiniteError(
        f"{bad[0]} at step {step}; stopped without saving it; "
        f"{self._last_checkpoint()}; to go on from there, rerun with "
        "--allow_config_change and a lower train.learning_rate, a "
        "train.grad_clip, or train.nan_policy=skip")
