#!/usr/bin/env python3
"""Trains the reproduction's cells and reports the findings (a)-(l).

  python scripts/reproduce.py [--findings a,b,...] [--seeds 0,1,2]
                              [--workdir runs/reproduce] [--report_only]
                              [--publish]

Every cell of the chosen findings (switchjax/findings.py) trains once per
seed in DIR/<cell>_s<seed> from experiments/repro/protocol.py; finished runs are kept,
an interrupted one resumes from its checkpoint (run the same command again).
Then it writes, in DIR:

  findings.json    per finding: cells, per-seed values, mean difference, 95 %
                   interval, verdict, seeds (switchjax/findings.py `record`)
  results.md       the report, with the figures below
  *.png            loss vs tokens (band over seeds), loss vs experts, the
                   speedup, capacity factor vs drops and loss, expert
                   specialisation by domain
  step_times.json  the protocol's step-time benchmark (findings c, d and the
                   throughput line): benchmarks/repro_throughput.py
  timing.jsonl     the time of every trained run, and the wall time of runs
                   trained side by side (--jobs): the measured total
  xla_cache/       compiled programs that recur (init and eval steps; the
                   train step across seeds)

The dense runs at 2x the tokens (the speedup of finding a) train after all
others, and only where Switch beats dense at 1x in some seed: otherwise
the speedup is at most 1, read off the dense run's own eval curve.

--publish also writes docs/results.md and docs/results/ (findings.json,
figures), the checked-in report; without it nothing outside DIR changes.
A partial rerun, e.g. finding (a) with new seeds:

  python scripts/reproduce.py --findings a --seeds 3,4,5 --workdir DIR

Runs of seeds beyond --seeds that DIR holds (such a rerun, in the same
DIR) are analysed again, alone and pooled with --seeds. The pooled
analysis is then the finding's verdict (findings.json and the table: the
most seeds there are); the --seeds one, the other seeds' and the power of a
3-seed rerun are in its `replication` and the report's "On other seeds".
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from switchjax import findings as F
from switchjax import grid as grid_lib
from switchjax import results as results_lib
from switchjax import stats

DOCS = os.path.join(ROOT, "docs")
PILOT = os.path.join(DOCS, "results", "pilot.md")
PUBLISHED = ("findings.json", "step_times.json", "specialisation.json")
# A finding's verdict and what it rests on (findings.record).
VERDICT_KEYS = ("seeds", "values", "per_seed_difference", "mean_difference",
                "interval_95", "verdict")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--findings", default=",".join(F.FINDINGS),
                 help=f"comma-separated, from {','.join(F.FINDINGS)}")
  p.add_argument("--seeds", default="0,1,2",
                 help="comma-separated seeds, at least 2 (3 for the report)")
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "reproduce"))
  p.add_argument("--report_only", action="store_true",
                 help="train nothing; report the runs DIR holds")
  p.add_argument("--publish", action="store_true",
                 help="also write docs/results.md and docs/results/")
  p.add_argument("--jobs", type=int, default=0,
                 help="runs trained side by side, each pinned to its own CPU "
                 "cores; 0 (default): one per core on a CPU-only host, else 1")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config key in every cell, e.g. "
                 "--set train.num_steps=600 (a cheaper protocol)")
  args = p.parse_args(argv)
  settings = []
  for item in args.set:
    key, eq, value = item.partition("=")
    if not eq or not key:
      p.error(f"--set: expected KEY=VALUE, got {item!r}")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    settings.append((key, value))
  args.set = settings
  if args.jobs < 0:
    p.error(f"--jobs: expected 0 (one per core on a CPU host) or more, got "
            f"{args.jobs}")
  args.findings = [f for f in args.findings.split(",") if f]
  unknown = [f for f in args.findings if f not in F.FINDINGS]
  if unknown or not args.findings:
    p.error(f"--findings: unknown {unknown or args.findings!r}; expected "
            f"some of {','.join(F.FINDINGS)}")
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
  except ValueError:
    p.error(f"--seeds: {args.seeds!r} is not a comma-separated list of ints")
  if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
    p.error(f"--seeds: need 2 or more distinct seeds, got {args.seeds}")
  return args


def base_config(settings: list[tuple[str, Any]]):
  """experiments/repro/protocol.py with the --set overrides."""
  base = grid_lib.load_experiment(F.EXPERIMENT, F.PRESET)
  return grid_lib.apply_overrides(base, dict(settings), "--set")


# make_grid's phases, trained in this order: the protocol-length runs, the
# runs that start from one of them (finding h), the longer runs (dense_2x).
PHASES = ("protocol", "started", "long")


def make_grid(findings: list[str], seeds: list[int],
              settings: list[tuple[str, Any]], phase: str | None = None,
              workdir: str = ""):
  """One sweep grid holding every (cell, seed) run of the findings, in
  order: tier by tier, then finding by finding, seed by seed (so every
  finding can be reported before the later tiers refine it, e.g. (b)'s
  4 and 16 experts), the runs that start from another run's weights after
  those, and the runs longer than the protocol (dense_2x) after all others.
  `phase` (one of PHASES) keeps only its runs; `workdir` is where the
  started runs find their sources."""
  steps = base_config(settings).train.num_steps
  runs = {}
  depth = max(len(F.FINDINGS[f].tiers) for f in findings)
  for level in range(depth):
    for f in findings:
      for tier in F.FINDINGS[f].tiers[level:level + 1]:
        for seed in seeds:
          for cell in tier:
            runs.setdefault(F.run_name(cell, seed), {
                **dict(settings),
                **F.cell_overrides(cell, steps, seed, workdir),
                "seed": seed})

  def phase_of(kv) -> int:
    if kv[1].get("train.num_steps", steps) > steps:
      return PHASES.index("long")
    started = any(kv[1].get(k) for k in F.START_KEYS)
    return PHASES.index("started" if started else "protocol")

  runs = dict(sorted(runs.items(), key=phase_of))  # stable: keeps the order
  if phase is not None:
    runs = {k: v for k, v in runs.items()
            if phase_of((k, v)) == PHASES.index(phase)}
  g = grid_lib.base_grid("reproduce", F.EXPERIMENT, F.PRESET)
  g.description = "The reproduction's runs (switchjax/findings.py)."
  g.cells = grid_lib.variants(**runs)
  return g


def _mean_drop_pct(train_rows) -> float:
  """Mean train dropped fraction of these log rows, in %; nan if none."""
  if not train_rows:
    return float("nan")
  return 100 * sum(float(r["dropped_fraction"]) for r in train_rows) / len(
      train_rows)


def _mean_loss(train_rows) -> float:
  """Mean train loss of these log rows; nan if none."""
  if not train_rows:
    return float("nan")
  return sum(float(r["loss"]) for r in train_rows) / len(train_rows)


def load_runs(workdir: str, cells) -> F.Runs:
  """{(cell, seed): Run} of the finished or diverged runs in workdir."""
  from switchjax import results  # pylint: disable=g-import-not-at-top
  out = {}
  for cell, config in cells:
    name, _, seed = cell.name.rpartition("_s")
    run_dir = os.path.join(workdir, cell.name)
    diverged = bool(results.diverged(run_dir))
    if not (diverged or results.is_finished(run_dir, config.train.num_steps)):
      continue
    row = results.summarize(run_dir, config, threshold=0.0)
    train, evals = results.read_metrics(run_dir)
    per_step = results.tokens_per_step(config)
    out[(name, int(seed))] = F.Run(
        eval_loss=float("nan") if diverged else float(row["eval_loss"]),
        curve=[(e["step"] * per_step, float(e["loss"])) for e in evals],
        dropped_pct=_mean_drop_pct(train),
        late_dropped_pct=_mean_drop_pct(
            [r for r in train if r["step"] > config.train.num_steps / 2]),
        eval_dropped_pct=100 * float(evals[-1]["dropped_fraction"])
        if evals else float("nan"),
        tokens_per_sec=float(row.get("tokens_per_sec", "nan")),
        diverged=diverged,
        max_grad_norm=float(row.get("max_grad_norm", "nan")),
        router_z_loss=float(train[-1].get("z_loss", "nan")) if train
        else float("nan"),
        late_train_loss=_mean_loss(
            [r for r in train if r["step"] > 0.75 * config.train.num_steps]),
        exact_match=float(evals[-1].get("exact_match", "nan"))
        if evals else float("nan"))
  return out


def step_times(workdir: str, train: bool) -> dict[str, Any]:
  """The step-time benchmark of the protocol's cells, run once per DIR."""
  path = os.path.join(workdir, "step_times.json")
  if not os.path.exists(path) and train:
    from benchmarks import repro_throughput  # pylint: disable=g-import-not-at-top
    print("== step-time benchmark -> " + path, flush=True)
    repro_throughput.main(["--json", path])
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def analyse(findings: list[str], runs: F.Runs, seeds: list[int],
            bench: dict[str, Any], tokens: float) -> dict[str, dict]:
  step_ms = {r["variant"]: r["step_ms"] for r in bench.get("rows", [])}
  out = {}
  for f in findings:
    fn = F.FINDINGS[f].analyse
    args = {"a": (tokens, step_ms), "c": (step_ms,), "d": (step_ms,),
            "i": (step_ms,)}.get(f, ())
    try:
      out[f] = fn(runs, seeds, *args)
    except F.Missing:
      missing = [F.run_name(c, s) for c in F.FINDINGS[f].cells
                 for s in seeds if (c, s) not in runs]
      out[f] = {"id": f, "verdict": "pending", "missing": missing,
                "seeds": list(seeds)}
    out[f]["claim"] = F.FINDINGS[f].claim
  return out


def other_seeds(workdir: str, seeds: list[int]) -> list[int]:
  """Seeds of the run directories in workdir (`<cell>_s<seed>`) beyond
  `seeds`: a replication trained there with --seeds of its own."""
  found = set()
  for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
    _, sep, seed = name.rpartition("_s")
    if sep and seed.isdigit() and os.path.isdir(os.path.join(workdir, name)):
      found.add(int(seed))
  return sorted(found - set(seeds))


def replicate(args, sweep, bench: dict[str, Any], tokens: float
              ) -> dict[str, dict]:
  """Every finding whose runs DIR also holds for two or more other seeds,
  analysed again on those seeds and on all seeds pooled: whether its
  verdict holds on seeds it was not made with."""
  extra = other_seeds(args.workdir, args.seeds)
  if len(extra) < 2:
    return {}
  out = {}
  for label, seeds in (("other_seeds", extra),
                       ("all_seeds", sorted(args.seeds + extra))):
    cells = sweep.prepare(make_grid(args.findings, seeds, args.set,
                                    workdir=args.workdir), None)
    found = analyse(args.findings, load_runs(args.workdir, cells), seeds,
                    bench, tokens)
    for f, r in found.items():
      if r["verdict"] != "pending":
        out.setdefault(f, {})[label] = {k: r[k] for k in VERDICT_KEYS}
  out = {f: v for f, v in out.items() if "other_seeds" in v}
  for v in out.values():
    if "all_seeds" in v:
      v["power"] = replication_power(v["all_seeds"], len(args.seeds))
  return out


def replication_power(pooled: dict[str, Any], n: int) -> dict[str, Any]:
  """What a rerun on n new seeds would show, if per-seed differences are
  normal with the pooled mean and sd (switchjax/stats.py)."""
  sd = float(np.std(pooled["per_seed_difference"], ddof=1))
  effect = pooled["mean_difference"]
  return {"sd": sd, "effect": effect, "seeds": n,
          "half_width": stats.half_width(sd, n),
          "resolve_probability": stats.resolve_probability(effect, sd, n),
          "seeds_for_90_percent": stats.seeds_for_replication(effect, sd)}


def _git(*args: str) -> str:
  try:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def train_runs(args, grid, cells, sweep) -> None:
  """Trains the protocol-length runs, then the dense_2x runs if the
  speedup needs them (`findings.needs_dense_2x`)."""
  protocol = make_grid(args.findings, args.seeds, args.set, "protocol",
                       args.workdir)
  sweep.run(protocol, args.workdir, jobs=args.jobs)
  started = make_grid(args.findings, args.seeds, args.set, "started",
                      args.workdir)
  if started.cells:
    # They read their sources' weights: every protocol run must have
    # finished (not stopped early by a signal; the same command resumes).
    runs = load_runs(args.workdir, cells)
    names = [name.rpartition("_s") for name, _ in protocol.cells]
    if not all((cell, int(seed)) in runs for cell, _, seed in names):
      return
    sweep.run(started, args.workdir, jobs=args.jobs)
  long = make_grid(args.findings, args.seeds, args.set, "long", args.workdir)
  if not long.cells:
    return
  runs = load_runs(args.workdir, cells)
  if not all((c, s) in runs for c in ("dense", "switch") for s in args.seeds):
    return  # stopped early (preempted): the same command resumes
  if not F.needs_dense_2x(runs, args.seeds):
    print("dense_2x not trained: Switch is no better than dense at 1x in "
          "every seed, so the speedup is at most 1 without them (read off "
          "the dense eval curve)", flush=True)
    return
  sweep.run(long, args.workdir, jobs=args.jobs)
  sweep.report(grid, args.workdir, cells)  # the table of every run


def default_jobs() -> int:
  """One run per core on a CPU-only host (their startups, compilations and
  evals overlap: about 1.1x the throughput for 600-step runs on 2 cores,
  switchjax/cell_pool.py), one at a time on an accelerator."""
  import jax  # pylint: disable=g-import-not-at-top
  from switchjax import cell_pool  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    return 1
  return len(cell_pool.usable_cores())


def main(argv=None) -> None:
  args = parse_args(argv)
  from switchjax import sweep  # pylint: disable=g-import-not-at-top
  if args.jobs == 0 and not args.report_only:
    args.jobs = default_jobs()
  from switchjax import repro_report  # pylint: disable=g-import-not-at-top
  try:
    grid = make_grid(args.findings, args.seeds, args.set,
                     workdir=args.workdir)
    cells = sweep.prepare(grid, None if args.report_only else args.workdir)
    if not args.report_only:
      train_runs(args, grid, cells, sweep)
  except ValueError as e:
    sys.exit(f"error: {e}")
  runs = load_runs(args.workdir, cells)
  bench = step_times(args.workdir, train=not args.report_only and any(
      f in args.findings for f in ("c", "d", "i")))
  base = base_config(args.set)
  tokens = base.train.num_steps * results_lib.tokens_per_step(base)
  results = analyse(args.findings, runs, args.seeds, bench, tokens)
  for f, again in replicate(args, sweep, bench, tokens).items():
    if results[f]["verdict"] != "pending":
      results[f]["replication"] = again
      if "all_seeds" in again:
        # The headline verdict rests on every seed there is; what --seeds
        # alone gave stays beside the others.
        again["made_with"] = {k: results[f][k] for k in VERDICT_KEYS}
        results[f].update(again["all_seeds"])
  with open(os.path.join(args.workdir, "findings.json"), "w") as f:
    json.dump(results, f, indent=1)
  command = "python scripts/reproduce.py" + "".join(
      f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
  commit = _git("rev-parse", "--short", "HEAD") or "unknown"
  if _git("status", "--porcelain"):
    commit += " (with uncommitted changes)"
  import jax  # pylint: disable=g-import-not-at-top
  meta = {"command": command, "commit": commit,
          "date": datetime.date.today().isoformat(),
          "machine": f"{os.cpu_count()} CPU cores "
                     f"({platform.processor() or platform.machine()})",
          "jax": jax.__version__, "hours": sweep.wall_hours(args.workdir),
          "pilot": open(PILOT).read() if os.path.exists(PILOT) else ""}
  report = repro_report.write(args.workdir, results, runs, bench, meta,
                              base)
  print(f"wrote {report} and {os.path.join(args.workdir, 'findings.json')}")
  if args.publish:
    publish(args, results, runs, bench, meta, base)


def publish(args, results, runs, bench, meta, base) -> None:
  """docs/results.md and docs/results/ from this workdir; the published
  findings it did not make (a rerun of some findings) stay as they were,
  with the figures and step times drawn from their runs."""
  from switchjax import repro_report  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(DOCS, "results")
  os.makedirs(out_dir, exist_ok=True)
  published = {}
  if os.path.exists(os.path.join(out_dir, "findings.json")):
    with open(os.path.join(out_dir, "findings.json")) as f:
      published = json.load(f)
  kept = [f for f in F.FINDINGS if f in published and f not in results]
  made_by = f"`{meta['command']}` on {meta['date']} at commit `{meta['commit']}`"
  results = {f: dict(r, made_by=made_by) for f, r in results.items()}
  for name in PUBLISHED + repro_report.FIGURES:
    # The specialisation probe reads finding (a)'s Switch run, as its figure.
    finding = repro_report.FIGURE_FINDING.get(
        "specialisation.png" if name == "specialisation.json" else name)
    if (name == "findings.json" or (finding in kept)
        or not os.path.exists(os.path.join(args.workdir, name))):
      continue
    shutil.copyfile(os.path.join(args.workdir, name),
                    os.path.join(out_dir, name))
  if kept:
    # Where each kept finding was made (the report's sentence for those
    # published before `made_by` was recorded), kept with it from now on.
    for f in kept:
      published[f].setdefault("made_by", _made_by())
    results = {f: results.get(f, published.get(f)) for f in F.FINDINGS
               if f in results or f in published}
    if not bench and os.path.exists(os.path.join(out_dir, "step_times.json")):
      with open(os.path.join(out_dir, "step_times.json")) as f:
        bench = json.load(f)
    spec = os.path.join(out_dir, "specialisation.json")
    if "a" in kept and os.path.exists(spec):
      shutil.copyfile(spec, os.path.join(args.workdir, "specialisation.json"))
    sources = list(dict.fromkeys(published[f]["made_by"] for f in kept))
    meta = dict(meta, kept=(
        f"Findings {', '.join(f'({f})' for f in kept)} are as published "
        f"before (made by {'; '.join(sources)}); their runs are not in this "
        "workdir."))
  with open(os.path.join(out_dir, "findings.json"), "w") as f:
    json.dump(results, f, indent=1)
  figures = [n for n in repro_report.FIGURES
             if os.path.exists(os.path.join(out_dir, n))]
  repro_report.write(args.workdir, results, runs, bench, meta, base,
                     path=os.path.join(DOCS, "results.md"),
                     figures="results", figure_names=figures)
  print(f"published {os.path.join(DOCS, 'results.md')} and {out_dir}/")


def _made_by() -> str:
  """The published report's "made by" sentence (its command and commit)."""
  path = os.path.join(DOCS, "results.md")
  if not os.path.exists(path):
    return "an earlier run"
  with open(path) as f:
    for line in f:
      if line.startswith("Made by"):
        return line.split(";")[0].strip().removeprefix("Made by ")
  return "an earlier run"


if __name__ == "__main__":
  main()
