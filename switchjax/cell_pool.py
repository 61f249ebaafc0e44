"""Training sweep cells: in this process, or side by side in worker processes.

On a CPU host, a run's startup, compilation and evals leave cores idle
that another run can use, so there several runs side by side finish a grid
sooner than one after another. Each worker process is pinned to its own
share of the cores (os.sched_setaffinity, where the OS has it) before JAX
starts, so that XLA sizes its thread pool to that share instead of every
worker spreading over every core.

Measured on the 2-core development host (`python -m
benchmarks.parallel_cells`: two dense protocol runs of 150 steps, cold):
282 s one after another, 217 s side by side, 1.30x. Steady training
gains little there (one run on 2 threads: ~3,550 tokens/s; two on one
core each: ~1,850 each), so for the reproduction's 600-step runs the gain
is about 1.1x (two dense runs side by side 667-712 s, against 376 s alone).

Each worker trains cells one after another and writes a cell's output to
DIR/<cell>/train.log. SIGTERM or Ctrl-C to the sweep reaches every worker
(forwarded as SIGTERM): cells in training save their step and stop, cells
not started are not started, and the same command resumes.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import ml_collections

LOG_FILE = "train.log"  # a worker's output for one cell, in the cell's dir
_stop_requested = False  # in a worker: a signal came outside training


def usable_cores() -> list[int]:
  """The CPU cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def core_shares(jobs: int) -> list[list[int]]:
  """`jobs` disjoint, contiguous, near-equal shares of the usable cores."""
  cores = usable_cores()
  if not 1 <= jobs <= len(cores):
    raise ValueError(f"--jobs {jobs}: expected 1 to {len(cores)}, the CPU "
                     "cores this process may use (one job per core at most)")
  n = len(cores)
  return [cores[i * n // jobs:(i + 1) * n // jobs] for i in range(jobs)]


def train_cell(config: ml_collections.ConfigDict, cell_dir: str,
               train_fn: Optional[Callable[..., Any]] = None
               ) -> dict[str, Any]:
  """Trains (or resumes) one cell; a NaN loss is recorded as diverged.

  Returns {"summary": what train_fn returned, "diverged": the error or None,
  "seconds": wall time, "resumed": whether a checkpoint was there}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from switchjax import results  # pylint: disable=g-import-not-at-top
  if train_fn is None:
    from switchjax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  resumed = os.path.isdir(os.path.join(cell_dir, "checkpoints"))
  start = time.perf_counter()
  diverged = None
  try:
    summary = train_fn(config, cell_dir) or {}
  except FloatingPointError as e:
    train_rows, _ = results.read_metrics(cell_dir)
    results.mark_diverged(cell_dir, str(e),
                          train_rows[-1]["step"] if train_rows else None)
    summary, diverged = {}, str(e)
  jax.clear_caches()  # this cell's compiled steps are not needed again
  return {"summary": summary, "diverged": diverged,
          "seconds": time.perf_counter() - start, "resumed": resumed}


def _note_stop(signum, frame) -> None:
  del signum, frame
  global _stop_requested
  _stop_requested = True


def _init_worker(shares, cache_dir: str) -> None:
  share = shares.get()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, share)
  # Training installs its own handlers (preemption.py); between cells a
  # signal only means: start no other cell.
  signal.signal(signal.SIGTERM, _note_stop)
  signal.signal(signal.SIGINT, _note_stop)
  from absl import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)


@contextlib.contextmanager
def _output_to(path: str):
  """Sends this process's stdout and stderr (file descriptors) to path."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with open(path, "a") as f:
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    try:
      yield
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])


def _work(config: ml_collections.ConfigDict, cell_dir: str
          ) -> Optional[dict[str, Any]]:
  """A worker's task: one cell, its output in cell_dir/train.log."""
  global _stop_requested
  if _stop_requested:
    return None
  os.makedirs(cell_dir, exist_ok=True)
  with _output_to(os.path.join(cell_dir, LOG_FILE)):
    outcome = train_cell(config, cell_dir)
  if outcome["summary"].get("preempted"):
    # Training's own handler took the signal: start no other cell either
    # (the pool hands out tasks before the sweep can cancel them).
    _stop_requested = True
  return outcome


def run_parallel(todo: list[tuple[str, ml_collections.ConfigDict, str]],
                 jobs: int, on_done: Callable[[str, dict[str, Any]], None],
                 log: Callable[[str], None] = print) -> None:
  """Trains todo's (name, config, cell_dir) in `jobs` pinned workers.

  Cells start in todo's order; on_done(name, outcome) runs in this process
  as each one ends. A signal or a preempted cell stops the work early: what
  was not started stays untrained.
  """
  import jax  # pylint: disable=g-import-not-at-top
  shares = core_shares(jobs)
  ctx = multiprocessing.get_context("spawn")  # a forked JAX is unsafe
  queue = ctx.Queue()
  for share in shares:
    queue.put(share)
  log(f"training {len(todo)} cells in {jobs} worker processes on cores "
      f"{' '.join(','.join(map(str, s)) for s in shares)}; each cell's "
      f"output goes to its {LOG_FILE}")
  stopped = []

  def stop(reason: str) -> None:
    if not stopped:
      log(f"{reason}: the cells in training save their step and stop; run "
          "the same command again to resume")
    stopped.append(reason)
    for child in multiprocessing.active_children():
      os.kill(child.pid, signal.SIGTERM)

  def forward(signum, frame) -> None:
    del frame
    stop(signal.Signals(signum).name)

  previous = {s: signal.signal(s, forward)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_init_worker,
        initargs=(queue, jax.config.jax_compilation_cache_dir or "")) as pool:
      futures = {pool.submit(_work, config, cell_dir): name
                 for name, config, cell_dir in todo}
      for future in concurrent.futures.as_completed(futures):
        if future.cancelled():
          continue  # not started: stopped before its turn
        outcome = future.result()
        if outcome is None:
          continue  # a signal came before it started
        on_done(futures[future], outcome)
        if outcome["summary"].get("preempted") and not stopped:
          stop(f"{futures[future]} stopped by "
               f"{outcome['summary']['preempted']}")
        if stopped:
          for other in futures:
            other.cancel()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
