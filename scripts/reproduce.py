#!/usr/bin/env python3
"""Runs the tiny ablation grids and writes docs/results.md.

  python scripts/reproduce.py [--workdir runs/reproduce] [--grids a,b]
                              [--report_only]

Trains every cell of the tiny grids in experiments/ablations/ on the bundled
corpus (cells already finished under --workdir are reused, interrupted ones
resume), copies each grid's results into docs/results/<grid>/ (the tables,
loss curves and expert loads that notebooks/ablations.ipynb reads, and the
figures), and writes docs/results.md: for each finding of the papers, what
the small-scale runs show and whether they agree. --report_only trains
nothing and reports what the workdirs hold; findings whose cells are missing
are marked pending.

Verdicts compare differences with the seed noise measured in the
capacity-factor grid (its two cells run with a second seed): a difference
smaller than that noise is "inconclusive", not agreement.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import subprocess
import sys
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from switchjax import grid as grid_lib
from switchjax import results as results_lib

GRIDS = ("capacity_factor", "num_experts", "routers", "stability")
COPIED = ("results.csv", "results.md", "curves.csv", "expert_load.json",
          "grid.json")

Rows = dict[str, dict[str, Any]]  # cell -> results row


def _loss(rows: Rows, cell: str) -> Optional[float]:
  r = rows.get(cell)
  if not r or r.get("status") != "done":
    return None
  value = r.get("eval_loss")
  return None if value in (None, "") else float(value)


def _fmt(x: Optional[float], digits: int = 3) -> str:
  return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


class Pending(Exception):
  """A finding's cells have not finished."""


def _need(rows: Rows, *cells: str) -> list[float]:
  values = [_loss(rows, c) for c in cells]
  missing = [c for c, v in zip(cells, values) if v is None]
  if missing:
    raise Pending(", ".join(missing))
  return values


def seed_noise(cf: Rows) -> float:
  """Largest |eval loss difference| between two seeds of one cell."""
  pairs = (("dense", "dense_seed1"), ("top1_cf1.25", "top1_cf1.25_seed1"))
  diffs = [abs(a - b) for a, b in (_need(cf, *p) for p in pairs)]
  return max(diffs)


def verdict(better: float, worse: float, noise: float) -> str:
  """Does `better` (the paper's winner) have the lower loss, beyond noise?"""
  if better < worse - noise:
    return "agrees"
  if better > worse + noise:
    return "disagrees"
  return "inconclusive (within seed noise)"


# ---------------------------------------------------------------------------
# The seven findings. Each returns (observation, verdict).


def finding_a(g: dict[str, Rows], noise: float) -> tuple[str, str]:
  cf = g["capacity_factor"]
  dense = _need(cf, "dense", "dense_seed1")
  switch = _need(cf, "top1_cf1.25", "top1_cf1.25_seed1")
  d, s = sum(dense) / 2, sum(switch) / 2
  text = (f"Eval loss after equal steps, Switch top-1 (8 experts, cf 1.25) "
          f"vs dense: seed 0 {_fmt(switch[0])} vs {_fmt(dense[0])}, seed 1 "
          f"{_fmt(switch[1])} vs {_fmt(dense[1])}; mean {_fmt(s)} vs "
          f"{_fmt(d)} (difference {_fmt(d - s)}; seed noise {_fmt(noise)}). "
          "Every top-1 cell (seed 0): " + ", ".join(
              f"cf {c} {_fmt(_loss(cf, f'top1_cf{c}'))}"
              for c in ("1.0", "1.25", "2.0")) + ".")
  v = verdict(s, d, noise)
  wins = sum(a < b for a, b in zip(switch, dense))
  if v != "agrees" and wins == len(dense):
    v += "; Switch lower in both seeds"
  return text, v


def finding_b(g: dict[str, Rows], noise: float) -> tuple[str, str]:
  ne = g["num_experts"]
  cells = ["dense", "e2", "e4", "e8", "e16", "e32"]
  losses = _need(ne, *cells)
  text = "Eval loss by experts (1 = dense): " + ", ".join(
      f"{c.lstrip('e') if c != 'dense' else '1'}: {_fmt(v)}"
      for c, v in zip(cells, losses)) + "."
  falls = sum(b < a for a, b in zip(losses, losses[1:]))
  text += (f" The loss falls at {falls} of {len(losses) - 1} doublings; "
           f"32 experts vs dense: {_fmt(losses[0] - losses[-1])} lower "
           f"(seed noise {_fmt(noise)}).")
  monotone = falls == len(losses) - 1
  v = verdict(losses[-1], losses[0], noise)
  if v == "agrees" and not monotone:
    v = "partly (more experts help overall, not at every doubling)"
  return text, v


def _metric(rows: Rows, cell: str, key: str) -> float:
  return float(rows[cell][key])


def finding_c(g: dict[str, Rows], noise: float) -> tuple[str, str]:
  cf = g["capacity_factor"]
  factors = ("1.0", "1.25", "2.0")
  parts, drops_fall, speed_falls, quality = [], True, True, []
  for k in ("top1", "top2"):
    cells = [f"{k}_cf{c}" for c in factors]
    losses = _need(cf, *cells)
    falls = all(b < a for a, b in zip(losses, losses[1:]))
    quality.append(f"{k} {verdict(losses[-1], losses[0], noise)}"
                   + (" (falls as the factor grows)" if falls else ""))
    drops = [_metric(cf, c, "dropped_pct") for c in cells]
    speed = [_metric(cf, c, "tokens_per_sec") for c in cells]
    reach = [cf[c].get("time_to_threshold") for c in cells]
    # Never more drops at a larger factor, and fewer at 2.0 than at 1.0
    # unless there were none to begin with.
    drops_fall &= (all(b <= a for a, b in zip(drops, drops[1:]))
                   and (drops[-1] < drops[0] or drops[0] == 0))
    speed_falls &= speed[-1] < speed[0]
    parts.append(
        f"{k}: dropped % " + " / ".join(f"{d:.1f}" for d in drops)
        + ", eval loss " + " / ".join(_fmt(v) for v in losses)
        + ", tokens/s " + " / ".join(f"{s:.0f}" for s in speed)
        + ", seconds to the loss threshold " + " / ".join(
            "never" if r in (None, "") else f"{float(r):.0f}" for r in reach))
  same = [_metric(cf, c, "tokens_per_sec") for c in ("dense", "dense_seed1")]
  spread = abs(same[0] - same[1]) / (sum(same) / 2)
  text = (f"At capacity factor {' / '.join(factors)}: " + "; ".join(parts)
          + ". Dropped counts tokens that reach no expert (a top-2 token only "
          "when both its choices are dropped). Throughput comes from a "
          "shared 2-core CPU: the same dense model ran "
          f"{100 * spread:.0f}% faster or slower in its two seeds, more than "
          "the expert buffers' size can change.")
  v = ("agrees on dropping" if drops_fall else "disagrees on dropping")
  v += ("; slower at a larger factor" if speed_falls
        else "; speed not resolved (no slowdown measured)")
  v += "; lower loss per step at 2.0 than at 1.0: " + ", ".join(quality)
  return text, v


def finding_d(g: dict[str, Rows], noise: float) -> tuple[str, str]:
  cf = g["capacity_factor"]
  rows, wins, lower = [], 0, 0
  for c in ("1.0", "1.25", "2.0"):
    top1, top2 = _need(cf, f"top1_cf{c}", f"top2_cf{c}")
    wins += verdict(top2, top1, noise) == "agrees"
    lower += top2 < top1
    s1 = _metric(cf, f"top1_cf{c}", "tokens_per_sec")
    s2 = _metric(cf, f"top2_cf{c}", "tokens_per_sec")
    rows.append(f"cf {c}: top-2 {_fmt(top2)} vs top-1 {_fmt(top1)} "
                f"({s2:.0f} vs {s1:.0f} tokens/s)")
  text = ("Eval loss at equal steps, " + "; ".join(rows)
          + f". Paper (Table 1): top-2 is a little better per step, top-1 "
          "faster per step and better per unit of time.")
  if wins == 3:
    v = "agrees (top-2 better per step at every factor)"
  elif wins:
    v = f"partly (top-2 better beyond noise at {wins} of 3 factors)"
  else:
    v = "inconclusive (no difference beyond seed noise)"
    if lower == 3:
      v += "; top-2 lower at all 3 factors"
  return text, v


def finding_e(g: dict[str, Rows], noise: float) -> tuple[str, str]:
  r = g["routers"]
  ec, tc2, tc, s = _need(r, "expert_choice", "gshard_cf2", "gshard", "switch")
  text = (f"Eval loss: expert choice in the encoder (EC-CF2, top-2 decoder) "
          f"{_fmt(ec)} vs top-2 token choice at the same capacity factor 2.0 "
          f"{_fmt(tc2)} (at 1.25: {_fmt(tc)}; Switch top-1 {_fmt(s)}). "
          "Zhou et al. 2022 find expert choice better at equal compute.")
  noisy = _loss(r, "noisy_topk")
  if noisy is not None:
    text += f" Noisy top-2 (Shazeer et al. 2017): {_fmt(noisy)}."
  return text, verdict(ec, tc2, noise)


def _stability_cells(st: Rows, prefix: str) -> list[str]:
  return sorted(c for c in st if c.startswith(prefix))


def _worst_rise(curve_rows: list[dict], cell: str) -> float:
  """Largest train-loss rise above its running minimum: a loss spike."""
  best, worst = math.inf, 0.0
  for c in curve_rows:
    if c["cell"] == cell and c["split"] == "train":
      loss = float(c["loss"])
      if not math.isfinite(loss):
        return math.inf
      best = min(best, loss)
      worst = max(worst, loss - best)
  return worst


def _stability_summary(st: Rows, curve_rows: list[dict],
                       cells: list[str]) -> tuple[int, float, float, float]:
  """(diverged, mean eval loss of the rest, worst spike, max grad norm)."""
  for c in cells:
    if st[c]["status"] not in ("done", "diverged"):
      raise Pending(c)
  diverged = sum(st[c]["status"] == "diverged" for c in cells)
  done = [float(st[c]["eval_loss"]) for c in cells
          if st[c]["status"] == "done"]
  mean = sum(done) / len(done) if done else math.nan
  spike = max(_worst_rise(curve_rows, c) for c in cells)
  norm = max(float(st[c]["max_grad_norm"]) for c in cells)
  return diverged, mean, spike, norm


def finding_f(g: dict[str, Rows], noise: float, curves: dict) -> tuple[str, str]:
  st = g["stability"]
  out = {}
  for name in ("router32", "router16"):
    out[name] = _stability_summary(st, curves["stability"],
                                   _stability_cells(st, name))
  text = "bfloat16 model, 4 cells each (init 0.1/1.0 x z-loss off/on): " + "; ".join(
      f"{'float32' if n == 'router32' else 'bfloat16'} router: "
      f"{d} diverged, mean eval loss {_fmt(m)}, worst loss spike "
      f"{_fmt(s, 2)} nats, max grad norm {_fmt(gn, 2)}"
      for n, (d, m, s, gn) in out.items()) + "."
  d32, d16 = out["router32"][0], out["router16"][0]
  if d16 > d32:
    v = "agrees (the bfloat16 router diverged more often)"
  elif d16 == d32 == 0:
    v = ("not reproduced at this scale: no run diverged; "
         + verdict(out["router32"][1], out["router16"][1], noise)
         + " on loss")
  else:
    v = "disagrees"
  return text, v


def finding_g(g: dict[str, Rows], noise: float, curves: dict) -> tuple[str, str]:
  st = g["stability"]
  out = {}
  for scale in ("0.1", "1.0"):
    cells = [c for c in st if f"_init{scale}_" in c]
    out[scale] = _stability_summary(st, curves["stability"], cells)
    out[scale] += (max(float(st[c]["eval_loss"]) for c in cells
                       if st[c]["status"] == "done")
                   - min(float(st[c]["eval_loss"]) for c in cells
                         if st[c]["status"] == "done"),)
  text = "bfloat16 model, 4 cells each (router float32/bfloat16 x z-loss off/on): " + "; ".join(
      f"init {s}: {d} diverged, mean eval loss {_fmt(m)} (spread across "
      f"the 4 cells {_fmt(spread)}), worst loss spike {_fmt(sp, 2)} nats, max "
      f"grad norm {_fmt(gn, 2)}" for s, (d, m, sp, gn, spread) in out.items()) + "."
  small, big = out["0.1"], out["1.0"]
  if small[0] < big[0]:
    v = "agrees (init 1.0 diverged more often)"
  elif small[0] > big[0]:
    v = "disagrees (init 0.1 diverged more often)"
  elif small[2] < big[2] and small[3] < big[3]:
    v = "agrees (smaller loss spikes and gradient norms at 0.1)"
  elif small[2] > big[2] and small[3] > big[3]:
    v = "disagrees (larger loss spikes and gradient norms at 0.1)"
  else:
    v = "inconclusive (no divergence; spike and gradient measures disagree)"
  v += f"; on loss at equal steps: {verdict(small[1], big[1], noise)}"
  return text, v


FINDINGS: tuple[tuple[str, str, tuple[str, ...], Callable], ...] = (
    ("a", "Switch beats the FLOP-matched dense model at equal steps "
     "(Switch §3, Table 1, Fig. 1)", ("capacity_factor",), finding_a),
    ("b", "More experts give a lower loss at equal active FLOPs "
     "(Switch Fig. 4)", ("num_experts", "capacity_factor"), finding_b),
    ("c", "A larger capacity factor drops fewer tokens, at a cost in speed "
     "(Switch Table 1)", ("capacity_factor",), finding_c),
    ("d", "Top-2 vs top-1 (Switch Table 1: top-2 a little better per step, "
     "top-1 faster)", ("capacity_factor",), finding_d),
    ("e", "Expert choice beats token choice at equal compute "
     "(Zhou et al. 2022)", ("routers", "capacity_factor"), finding_e),
    ("f", "A float32 router is needed for bfloat16 stability "
     "(Switch Table 2)", ("stability", "capacity_factor"), finding_f),
    ("g", "Init scale 0.1 is more stable than 1.0 (Switch Table 3)",
     ("stability", "capacity_factor"), finding_g),
)


def _git(*args: str) -> str:
  try:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def run_grids(names: list[str], workdir: str, report_only: bool) -> None:
  """Runs (or reports) the grids in order; stops after a stopped sweep."""
  from switchjax import sweep  # pylint: disable=g-import-not-at-top
  for name in names:
    grid = grid_lib.load_grid(
        os.path.join(ROOT, "experiments", "ablations", f"{name}.py:tiny"))
    directory = os.path.join(workdir, name)
    if report_only:
      if os.path.isdir(directory):
        print(f"== {name}: reporting {directory}", flush=True)
        sweep.report(grid, directory, sweep.prepare(grid, None))
      continue
    print(f"== {name} -> {directory}", flush=True)
    rows = sweep.run(grid, directory)
    if any(r["status"] not in ("done", "diverged") for r in rows):
      print(f"== {name} stopped before its last cell (preempted?); the "
            "report marks what is missing; run again to resume", flush=True)
      return


def collect(names: list[str], workdir: str, out_dir: str
            ) -> tuple[dict[str, Rows], dict[str, list]]:
  """Copies each grid's results into out_dir/<grid>; returns rows, curves.

  A grid without results under `workdir` keeps the copy already in out_dir
  (the checked-in results), so one grid can be rerun on its own.
  """
  rows, curves = {}, {}
  for name in names:
    src, dst = os.path.join(workdir, name), os.path.join(out_dir, name)
    if os.path.exists(os.path.join(src, "results.csv")):
      os.makedirs(dst, exist_ok=True)
      for f in COPIED + tuple(p for p in os.listdir(src)
                              if p.endswith(".png")):
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    elif not os.path.exists(os.path.join(dst, "results.csv")):
      continue
    grid_rows, curve_rows, _ = results_lib.load(dst)
    rows[name] = {r["cell"]: r for r in grid_rows}
    curves[name] = curve_rows
  return rows, curves


def _markdown(docstring: str) -> str:
  """A grid's docstring as markdown: paragraphs joined, indented blocks kept."""
  out, text, block = [], [], []

  def flush():
    if text:
      out.append(" ".join(" ".join(text).split()))
      text.clear()
    if block:
      out.append("```\n" + "\n".join(block) + "\n```")
      block.clear()
  for line in docstring.strip().splitlines():
    if line.startswith("  "):
      if text:
        flush()
      block.append(line[2:])
    elif not line.strip():
      flush()
    else:
      if block:
        flush()
      text.append(line)
  flush()
  return "\n\n".join(out)


def write_report(path: str, grids: dict[str, Rows], curves: dict,
                 command: str, out_dir: str) -> None:
  commit = _git("rev-parse", "--short", "HEAD") or "unknown"
  dirty = " (with uncommitted changes)" if _git("status", "--porcelain") else ""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    noise = seed_noise(grids.get("capacity_factor", {}))
  except Pending:
    noise = None
  lines = [
      "# Small-scale reproduction of the papers' findings", "",
      f"Made by `{command}` on {datetime.date.today().isoformat()} at commit "
      f"`{commit}`{dirty}; {os.cpu_count()} CPU cores "
      f"({platform.processor() or platform.machine()}), JAX {jax.__version__}."
      + (" The cells were trained by `python scripts/reproduce.py` (about "
         "two hours on 2 CPU cores; finished cells are kept in its workdir "
         "and interrupted ones resume); `--report_only` re-read their "
         "results."
         if "--report_only" in command else ""),
      "",
      "Tiny models (d_model 128, 2 + 2 layers with one sparse FFN per stack, "
      "8 experts unless varied, span corruption with 128 inputs / 32 "
      "targets, batch 16) trained for a few hundred steps on the bundled "
      "corpus (KJV Bible + Python docs), seed 0 unless a cell says "
      "otherwise. Losses are eval cross-entropy in nats per target token at "
      "the last step. The models are about a thousand times smaller than "
      "Switch-Base and train on about a millionth of its tokens: agreement "
      "or disagreement here says what happens at this scale, not at "
      "theirs.", "",
      ("Seed noise: the largest eval-loss difference between seeds 0 and 1 "
       f"of one cell is {_fmt(noise)} nats (dense and Switch cf 1.25 cells "
       "of the capacity-factor grid); differences smaller than that are "
       "called inconclusive." if noise is not None else
       "Seed noise: pending (capacity-factor grid not finished)."), "",
      "## Findings", "",
      "| | paper's finding | observed here | agrees? |", "|---|---|---|---|"]
  for key, claim, needs, fn in FINDINGS:
    missing = [n for n in needs if n not in grids]
    if missing or noise is None:
      obs, v = f"pending: grid {', '.join(missing or ['capacity_factor'])} not run", "pending"
    else:
      try:
        args = (grids, noise) + ((curves,) if key in ("f", "g") else ())
        obs, v = fn(*args)
      except Pending as e:
        obs, v = f"pending: cells {e} not finished", "pending"
    lines.append(f"| ({key}) | {claim} | {obs} | {v} |")
  for name in GRIDS:
    if name not in grids:
      continue
    grid = grid_lib.load_grid(
        os.path.join(ROOT, "experiments", "ablations", f"{name}.py:tiny"))
    rel = os.path.relpath(os.path.join(out_dir, name), os.path.dirname(path))
    with open(os.path.join(out_dir, name, "results.md")) as f:
      table = f.read().split("\n", 2)[2]  # drop the title line
    lines += ["", f"## Grid `{name}`", "",
              _markdown(grid.description), "",
              f"`python -m switchjax.sweep --config "
              f"experiments/ablations/{name}.py:tiny --workdir DIR`", "",
              table.rstrip(), "",
              f"![loss curves]({rel}/loss_curves.png)"]
    if grid.x_axis:
      png = f"final_vs_{grid.x_axis.split('.')[-1]}.png"
      lines.append(f"![final loss vs {grid.x_axis}]({rel}/{png})")
    lines.append(f"![expert load]({rel}/expert_load.png)")
  lines += ["", "Column definitions: see `switchjax/results.py`. Data: "
            f"`{os.path.relpath(out_dir, ROOT)}/<grid>/` (read by "
            "`notebooks/ablations.ipynb`).", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs",
                                                        "reproduce"))
  parser.add_argument("--grids", default=",".join(GRIDS),
                      help=f"comma-separated, from {', '.join(GRIDS)}")
  parser.add_argument("--report_only", action="store_true",
                      help="train nothing; report what the workdirs hold")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs",
                                                    "results.md"))
  args = parser.parse_args(argv)
  names = [n for n in args.grids.split(",") if n]
  unknown = sorted(set(names) - set(GRIDS))
  if unknown:
    parser.error(f"unknown grids {unknown}; expected some of {GRIDS}")
  run_grids(names, args.workdir, args.report_only)
  out_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                         "results")
  grids, curves = collect(list(GRIDS), args.workdir, out_dir)
  command = "python scripts/reproduce.py" + "".join(
      f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
  write_report(args.out, grids, curves, command, out_dir)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
