"""Where metrics go: metrics.jsonl, TensorBoard, and the terminal.

Only process 0 writes (multi-host runs log once). metrics.jsonl is opened in
append mode and every line is flushed, so a killed run loses nothing it has
logged; a resumed run first drops lines past its restore step, so the file
reads as if the run was never stopped.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

import numpy as np


def _plain(value: Any) -> Any:
  """JSON-friendly Python values from numpy / jax scalars and arrays."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  arr = np.asarray(value)
  if arr.ndim > 0:
    return [_plain(v) for v in arr.tolist()]
  item = arr.item()
  if isinstance(item, float) and not math.isfinite(item):
    return str(item)  # JSON has no NaN; keep the fact, not a parse error
  return item


def truncate_metrics(path: str, after_step: int) -> None:
  """Drops lines of `path` with step > after_step (a resume replays them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= after_step:
        kept.append(line)
    except (ValueError, KeyError):
      pass  # a half-written last line from a killed run
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class MetricsWriter:
  """metrics.jsonl + TensorBoard + a progress bar (tty) or log lines."""

  def __init__(self, workdir: str, *, total_steps: int, first_step: int,
               enabled: bool = True):
    self.enabled = enabled
    self._bar = None
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # purge_step hides the events a killed run logged past its restore step.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=first_step + 1)
    if sys.stderr.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=first_step,
                            dynamic_ncols=True, desc="train")

  def write(self, step: int, metrics: dict[str, Any],
            split: Optional[str] = None) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    if split:
      record["split"] = split
    record.update(_plain(metrics))
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    prefix = f"{split}/" if split else "train/"
    for key, value in record.items():
      if isinstance(value, (int, float)) and key != "step":
        self._tb.add_scalar(prefix + key, value, step)
    self._tb.flush()
    summary = " ".join(
        f"{k}={v:.4g}" for k, v in record.items()
        if k in ("loss", "aux_loss", "z_loss", "dropped_fraction",
                 "tokens_per_sec", "accuracy", "exact_match")
        and isinstance(v, float))
    if self._bar is not None:
      if split is None:
        self._bar.set_postfix_str(summary)
      else:
        self._bar.write(f"step {step} {split}: {summary}")
    else:
      print(f"step {step}{' ' + split if split else ''}: {summary}",
            flush=True)

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.refresh()

  def close(self, quiet: bool = False) -> None:
    """Closes everything; quiet: swallow write errors (a fault is already
    being reported, e.g. the disk is full)."""
    for closer in (self._bar, self._jsonl, self._tb):
      if closer is None:
        continue
      try:
        closer.close()
      except OSError:
        if not quiet:
          raise
    self._bar = self._jsonl = self._tb = None
