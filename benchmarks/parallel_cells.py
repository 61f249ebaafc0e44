"""Cells one after another against cells side by side (`--jobs`), in one run.

Trains the same grid twice from cold: the reproduction protocol's dense
cell (experiments/repro/protocol.py) at `--seeds` seeds, `--steps` steps
each, with its evals; once with `python -m switchjax.sweep --jobs 1`, once
with `--jobs N` (each worker pinned to its own cores, switchjax/cell_pool.py),
each sweep in its own fresh workdir and compilation cache. Prints both wall
times and their ratio: the throughput `--jobs` buys on this host, startup,
compilation and evals included.

  python -m benchmarks.parallel_cells [--seeds 2] [--steps 150] [--jobs 2]

This file is also the grid the two sweeps train (`get_config("SEEDS,STEPS")`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from switchjax import grid as grid_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str = "2,150"):
  seeds, steps = (int(x) for x in arg.split(","))
  g = grid_lib.base_grid("parallel_cells", "experiments/repro/protocol.py",
                         "dense")
  g.overrides.train = {"num_steps": steps, "eval_every": max(1, steps // 2),
                       "checkpoint_every": steps}
  g.axes = (grid_lib.axis("seed", list(range(seeds)), label="s"),)
  return g


def _sweep_seconds(spec: str, jobs: int, workdir: str) -> float:
  env = {k: v for k, v in os.environ.items()
         if k != "JAX_COMPILATION_CACHE_DIR"}  # each sweep: its own cache
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "switchjax.sweep",
                  f"--config={os.path.abspath(__file__)}:{spec}",
                  f"--workdir={workdir}", f"--jobs={jobs}"],
                 cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
  return time.perf_counter() - start


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--jobs", type=int, default=2)
  args = p.parse_args()
  spec = f"{args.seeds},{args.steps}"
  with tempfile.TemporaryDirectory(prefix="parallel_cells_") as root:
    one = _sweep_seconds(spec, 1, os.path.join(root, "jobs1"))
    many = _sweep_seconds(spec, args.jobs, os.path.join(root, "jobsN"))
  print(f"{args.seeds} dense protocol runs of {args.steps} steps "
        f"({os.cpu_count()} CPU cores):")
  print(f"  --jobs 1          {one:7.1f} s")
  print(f"  --jobs {args.jobs:<10d} {many:7.1f} s")
  print(f"  throughput ratio  {one / many:.2f}x")


if __name__ == "__main__":
  main()
