r"""Runs an ablation grid: one workdir per cell, then a results table and plots.

  python -m switchjax.sweep --config experiments/ablations/capacity_factor.py:tiny \
      --workdir runs/capacity_factor [--config.overrides.train.num_steps=100]

Cells train one after another in this process, each in DIR/<cell> exactly as
`python -m switchjax.main` would train it; `--jobs N` trains N side by side
in worker processes, each pinned to its own share of the CPU cores (on a
CPU host; switchjax/cell_pool.py), each cell's output in
DIR/<cell>/train.log. Run the same command again and finished cells are
skipped, an interrupted one resumes from its newest checkpoint, and the
table and plots are rebuilt. A cell whose loss becomes
NaN is recorded as diverged (DIR/<cell>/diverged.json) and not retried;
delete its directory to train it again. SIGTERM or Ctrl-C stops the cells
in training at a step boundary (saved) and the sweep with them.

Writes DIR/results.csv, DIR/results.md, DIR/curves.csv,
DIR/expert_load.json (see results.py), DIR/loss_curves.png,
DIR/final_vs_<axis>.png, DIR/expert_load.png, DIR/grid.json,
DIR/timing.jsonl (seconds each cell trained; with --jobs also the wall time
of the parallel part) and DIR/xla_cache (JAX's
persistent compilation cache: a program that recurs across cells compiles
once; set JAX_COMPILATION_CACHE_DIR to move it).

  python -m switchjax.sweep --config ... --workdir DIR --print_commands

prints one `python -m switchjax.main` command per cell instead, to launch
each on a cluster; `python -m switchjax.sweep ... --report_only` then builds
the table and plots from their workdirs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from switchjax import grid as grid_lib

config_flags.DEFINE_config_file(
    "config", None,
    "Grid file, e.g. experiments/ablations/capacity_factor.py:tiny.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "The sweep's directory; cell i trains "
                    "in DIR/<cell name>.")
flags.DEFINE_bool("print_commands", False,
                  "Print one training command per cell and exit.")
flags.DEFINE_integer("jobs", 1, "Cells trained side by side, each in a "
                     "worker process pinned to its own CPU cores "
                     "(switchjax/cell_pool.py); 1: one after another here.")
flags.DEFINE_bool("report_only", False,
                  "Train nothing; build the table and plots from what the "
                  "cells' workdirs hold.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
TIMING_FILE = "timing.jsonl"  # one line per trained (or resumed) cell
COMPILATION_CACHE = "xla_cache"  # JAX's persistent compilation cache


def _x_axis_index(grid: ml_collections.ConfigDict) -> int | None:
  """Which axis sets grid.x_axis (its labels are the x, the rest the series)."""
  if not grid.x_axis:
    return None
  for i, ax in enumerate(grid.axes):
    if all(grid.x_axis in overrides for _, overrides in ax):
      return i
  return None


def _check_finished_cell(config: ml_collections.ConfigDict, cell_dir: str,
                         where: str) -> None:
  """A finished cell must hold this config's run.

  Compared on the keys both configs have, so a run made before the schema
  gained keys (which then hold their defaults) still counts as finished.
  """
  from switchjax import validate  # pylint: disable=g-import-not-at-top
  path = os.path.join(cell_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = validate.canonical_values(grid_lib.flatten(json.load(f)))
  new = validate.canonical_values(grid_lib.flatten(json.loads(config.to_json())))
  changed = sorted(k for k in old.keys() & new.keys()
                   if old[k] != new[k] and k not in validate.RUN_KEYS)
  if changed:
    raise ValueError(
        f"{where}: {cell_dir} holds a finished run of another config "
        f"(differs in: {', '.join(changed)}); delete it or use a new --workdir")


def prepare(grid: ml_collections.ConfigDict, workdir: str | None
            ) -> list[tuple[grid_lib.Cell, ml_collections.ConfigDict]]:
  """Every cell's validated config; any bad cell raises before work starts.

  With a workdir, also checks that each cell's directory can take its run
  (an unfinished cell) or holds it (a finished one).
  """
  from switchjax import results  # pylint: disable=g-import-not-at-top
  from switchjax import validate  # pylint: disable=g-import-not-at-top
  out = []
  for cell, config in grid_lib.cell_configs(grid):
    grid_lib.check_x_axis(grid, config)
    where = f"grid {grid.name!r} cell {cell.name!r}"
    try:
      config = validate.prepare(config)
      if workdir is not None:
        cell_dir = os.path.join(workdir, cell.name)
        if (results.diverged(cell_dir)
            or results.is_finished(cell_dir, config.train.num_steps)):
          _check_finished_cell(config, cell_dir, where)
        else:
          validate.check_workdir(config, cell_dir, allow_config_change=False)
    except validate.ConfigError as e:
      raise ValueError(f"{where}: {e}") from None
    out.append((cell, config))
  return out


def _train(config: ml_collections.ConfigDict, cell_dir: str
           ) -> dict[str, Any]:
  from switchjax import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, cell_dir)


def run(grid: ml_collections.ConfigDict, workdir: str, *, jobs: int = 1,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Trains every unfinished cell of grid under workdir; returns the rows.

  jobs > 1 trains that many cells side by side in worker processes, each
  pinned to its own CPU cores (cell_pool.py); 1 trains them here.
  """
  from switchjax import cell_pool  # pylint: disable=g-import-not-at-top
  from switchjax import results  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    # Programs that recur across cells (init and eval steps; the train
    # step of cells that differ only in the seed or at init) compile once.
    # The learning rate is baked into the train step: it compiles per rate.
    # Takes effect only if this process has compiled nothing yet.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(workdir, COMPILATION_CACHE))
  cells = prepare(grid, workdir)
  cell_pool.core_shares(jobs)  # a bad --jobs fails before any work
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "grid.json"), "w") as f:
    json.dump(grid.to_dict(), f, indent=1, default=str)
  todo = []
  for i, (cell, config) in enumerate(cells):
    cell_dir = os.path.join(workdir, cell.name)
    where = f"[{i + 1}/{len(cells)}] {cell.name}"
    if results.diverged(cell_dir):
      log(f"{where}: diverged earlier, skipped (delete {cell_dir} to retry)")
    elif results.is_finished(cell_dir, config.train.num_steps):
      log(f"{where}: finished, skipped")
    else:
      todo.append((where, cell.name, config, cell_dir))

  def done(where: str, name: str, outcome: dict[str, Any]) -> None:
    if outcome["diverged"]:
      log(f"{where}: diverged: {outcome['diverged']}")
    _log_time(workdir, name, outcome["seconds"], outcome["resumed"], jobs)

  if jobs > 1 and len(todo) > 1:
    start = time.perf_counter()
    names = {where: name for where, name, _, _ in todo}

    def finished(where: str, outcome: dict[str, Any]) -> None:
      stopped_by = outcome["summary"].get("preempted")
      if stopped_by:
        log(f"{where}: stopped by {stopped_by} after {outcome['seconds']:.0f} "
            "s, its step saved")
      elif not outcome["diverged"]:
        log(f"{where}: {'resumed and ' if outcome['resumed'] else ''}trained "
            f"in {outcome['seconds']:.0f} s")
      done(where, names[where], outcome)
    try:
      cell_pool.run_parallel([(w, c, d) for w, _, c, d in todo], jobs,
                             finished, log)
    finally:  # the wall time: the cells' own times overlap
      _log_time(workdir, None, time.perf_counter() - start, None, jobs,
                sweep=grid.name)
    return report(grid, workdir, cells)
  for where, name, config, cell_dir in todo:
    resuming = os.path.isdir(os.path.join(cell_dir, "checkpoints"))
    log(f"{where}: {'resuming' if resuming else 'training'} in {cell_dir}")
    outcome = cell_pool.train_cell(config, cell_dir, _train)
    done(where, name, outcome)
    if outcome["summary"].get("preempted"):
      # The run saved its step and returned: stop the sweep too, so that
      # a preemption notice ends it; the same command resumes this cell.
      log(f"{where}: stopped by {outcome['summary']['preempted']}; the "
          "sweep stops here, run the same command again to resume")
      break
  return report(grid, workdir, cells)


def _log_time(workdir: str, cell: str | None, seconds: float,
              resumed: bool | None, jobs: int, sweep: str | None = None
              ) -> None:
  """Appends a line to DIR/timing.jsonl (resumes add lines).

  A cell's training time, with the jobs it shared the host with; for
  jobs > 1 also the wall time of the whole parallel sweep (`sweep`), the
  measured cost of those cells together.
  """
  line = ({"sweep": sweep} if sweep else
          {"cell": cell, "resumed": resumed})
  line.update(seconds=round(seconds, 1), jobs=jobs)
  with open(os.path.join(workdir, TIMING_FILE), "a") as f:
    f.write(json.dumps(line) + "\n")


def wall_hours(workdir: str) -> float:
  """Hours DIR/timing.jsonl records: one-job cells plus parallel sweeps.

  Lines without "jobs" (written before sweeps ran jobs) are one-job cells.
  """
  path = os.path.join(workdir, TIMING_FILE)
  if not os.path.exists(path):
    return 0.0
  total = 0.0
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        if "sweep" in r or r.get("jobs", 1) == 1:
          total += r["seconds"]
  return total / 3600


def report(grid: ml_collections.ConfigDict, workdir: str,
           cells: list[tuple[grid_lib.Cell, ml_collections.ConfigDict]]
           ) -> list[dict[str, Any]]:
  """Writes the results files and plots of workdir; returns the rows."""
  from switchjax import model  # pylint: disable=g-import-not-at-top
  from switchjax import plots  # pylint: disable=g-import-not-at-top
  from switchjax import results  # pylint: disable=g-import-not-at-top
  x_index = _x_axis_index(grid)
  rows, curve_rows, loads = [], [], {}
  for cell, config in cells:
    cell_dir = os.path.join(workdir, cell.name)
    total, active = model.param_counts(config)
    row = {"cell": cell.name, "params_total": total, "params_active": active,
           "series": cell.name, "x": ""}
    if not cell.is_extra and x_index is not None:
      row["series"] = "_".join(l for j, l in enumerate(cell.labels)
                               if j != x_index)
      row["x"] = grid_lib.flatten(config)[grid.x_axis]
    row.update(results.summarize(cell_dir, config,
                                 threshold=grid.loss_threshold))
    rows.append(row)
    curve_rows += results.curves(cell.name, cell_dir)
    loads[cell.name] = results.expert_load(cell_dir)
  title = f"{grid.name} ({grid.experiment}:{grid.preset})"
  results.write(workdir, rows, curve_rows, loads, title=title,
                threshold=grid.loss_threshold)
  plots.save_all(workdir, rows, curve_rows, loads, grid.x_axis)
  return rows


def print_commands(grid: ml_collections.ConfigDict, workdir: str) -> None:
  for cell, _ in grid_lib.cell_configs(grid):  # checks every key first
    print(grid_lib.command(grid, cell, workdir))


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  grid = FLAGS.config
  if FLAGS.print_commands:  # without importing JAX
    try:
      print_commands(grid, FLAGS.workdir)
    except ValueError as e:
      sys.exit(f"error: {e}")
    return
  from switchjax import faults  # pylint: disable=g-import-not-at-top
  from switchjax import results  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.report_only:
      rows = report(grid, FLAGS.workdir, prepare(grid, None))
    else:
      rows = run(grid, FLAGS.workdir, jobs=FLAGS.jobs)
  except (ValueError, faults.RunError) as e:  # one line; a rerun resumes
    sys.exit(f"error: {e}")
  print(results.markdown_table(rows, grid.loss_threshold))
  print(f"results: {os.path.join(FLAGS.workdir, 'results.md')} (.csv, *.png)")


if __name__ == "__main__":
  app.run(main)
