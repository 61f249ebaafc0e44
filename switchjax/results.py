"""A sweep's results: one summary row per cell, from its metrics.jsonl.

Files under a sweep's DIR (and under docs/results/<grid>/ for the checked-in
tiny runs), all written by `write` and read back by `load`:

  results.csv        one row per cell, COLUMNS
  results.md         the same as a table a paper would print
  curves.csv         cell, split, step, loss: every logged loss
  expert_load.json   {cell: {layer: [E floats]}} from the last eval

How the columns are computed:
  train_loss       the last logged train loss (token cross-entropy, nats).
  eval_loss        the last eval's loss (at moe.eval_capacity_factor).
  dropped_pct      100 x the mean train `dropped_fraction` over the last
                   quarter of the logged train steps (at the train capacity
                   factor; single steps are noisy).
  tokens_per_sec   the median train throughput, without the first logged
                   interval (it holds the compilation).
  steps_to_threshold  the first logged train step with loss <= the grid's
                   loss_threshold; empty if never.
  time_to_threshold   seconds of training to that step: each logged
                   interval's steps x tokens per step / its throughput (the
                   first interval at the median throughput), so compilation,
                   evals and checkpoints are not counted.
  status           done | diverged | incomplete | not started
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Optional

import numpy as np

COLUMNS = ("cell", "series", "x", "status", "steps", "params_total",
           "params_active", "train_loss", "eval_loss", "dropped_pct",
           "tokens_per_sec", "steps_to_threshold", "time_to_threshold",
           "max_grad_norm", "seed")
DIVERGED_FILE = "diverged.json"


def read_metrics(cell_dir: str) -> tuple[list[dict], list[dict]]:
  """(train lines, eval lines) of cell_dir/metrics.jsonl; [] if none."""
  path = os.path.join(cell_dir, "metrics.jsonl")
  train, evals = [], []
  if not os.path.exists(path):
    return train, evals
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a half-written last line of a killed run
      (evals if row.get("split") == "eval" else train).append(row)
  return train, evals


def _num(value: Any) -> float:
  """A metric as float; writers.py stores non-finite values as strings."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def is_finished(cell_dir: str, num_steps: int) -> bool:
  """The cell reached num_steps: its final eval is logged and checkpointed."""
  if not os.path.isdir(os.path.join(cell_dir, "checkpoints", str(num_steps))):
    return False
  _, evals = read_metrics(cell_dir)
  return any(r["step"] == num_steps for r in evals)


def diverged(cell_dir: str) -> Optional[dict]:
  path = os.path.join(cell_dir, DIVERGED_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def mark_diverged(cell_dir: str, error: str, step: Optional[int]) -> None:
  with open(os.path.join(cell_dir, DIVERGED_FILE), "w") as f:
    json.dump({"error": error, "last_logged_step": step}, f)


def tokens_per_step(config) -> int:
  d = config.data
  per_example = (d.inputs_length + d.targets_length
                 if config.model.arch == "encoder_decoder" else d.seq_length)
  return config.train.batch_size * per_example


def summarize(cell_dir: str, config, *, threshold: float) -> dict[str, Any]:
  """The results row of one cell (without cell/series/x/params)."""
  train, evals = read_metrics(cell_dir)
  num_steps = config.train.num_steps
  row: dict[str, Any] = {"seed": config.seed, "steps": 0}
  if diverged(cell_dir):
    row["status"] = "diverged"
  elif is_finished(cell_dir, num_steps):
    row["status"] = "done"
  else:
    row["status"] = "incomplete" if train else "not started"
  if not train:
    return row
  row["steps"] = train[-1]["step"]
  row["train_loss"] = _num(train[-1]["loss"])
  if evals:
    row["eval_loss"] = _num(evals[-1]["loss"])
  tail = train[len(train) - max(1, len(train) // 4):]
  row["dropped_pct"] = 100 * float(np.mean([_num(r["dropped_fraction"])
                                            for r in tail]))
  rates = [_num(r["tokens_per_sec"]) for r in train]
  steady = rates[1:] or rates
  median = float(np.median(steady))
  row["tokens_per_sec"] = median
  norms = [_num(r.get("grad_norm")) for r in train]
  row["max_grad_norm"] = float(np.nanmax(norms)) if not np.all(
      np.isnan(norms)) else math.nan
  seconds, prev = 0.0, 0
  per_step = tokens_per_step(config)
  for i, r in enumerate(train):
    rate = median if i == 0 else rates[i]
    seconds += (r["step"] - prev) * per_step / rate
    prev = r["step"]
    if _num(r["loss"]) <= threshold:
      row["steps_to_threshold"] = r["step"]
      row["time_to_threshold"] = seconds
      break
  return row


def curves(cell: str, cell_dir: str) -> list[dict[str, Any]]:
  train, evals = read_metrics(cell_dir)
  return ([{"cell": cell, "split": "train", "step": r["step"],
            "loss": _num(r["loss"])} for r in train]
          + [{"cell": cell, "split": "eval", "step": r["step"],
              "loss": _num(r["loss"])} for r in evals])


def expert_load(cell_dir: str) -> dict[str, list[float]]:
  """{layer: expert_load f32[E]} of the last eval; {} for a dense model."""
  _, evals = read_metrics(cell_dir)
  if not evals:
    return {}
  return {name: [float(x) for x in layer["expert_load"]]
          for name, layer in sorted(evals[-1].get("layers", {}).items())}


def _human(n: Any) -> str:
  if n in (None, ""):
    return ""
  n = float(n)
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.0f}"


def _f(value: Any, digits: int) -> str:
  if value in (None, ""):
    return ""
  value = float(value)
  return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], threshold: float) -> str:
  """The table a paper would print, one line per cell."""
  head = ("| cell | params (total / active) | train loss | eval loss | "
          f"tokens dropped % | tokens/s | steps to loss {threshold:g} | "
          f"time to loss {threshold:g} (s) | status |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    params = (f"{_human(r.get('params_total'))} / "
              f"{_human(r.get('params_active'))}")
    lines.append(
        f"| {r['cell']} | {params} | {_f(r.get('train_loss'), 3)} | "
        f"{_f(r.get('eval_loss'), 3)} | {_f(r.get('dropped_pct'), 1)} | "
        f"{_f(r.get('tokens_per_sec'), 0)} | "
        f"{r.get('steps_to_threshold', '') or '—'} | "
        f"{_f(r.get('time_to_threshold'), 0) or '—'} | "
        f"{r['status']}{' @ ' + str(r['steps']) if r['status'] != 'done' else ''} |")
  return "\n".join(lines) + "\n"


def write(directory: str, rows: list[dict[str, Any]],
          curve_rows: list[dict[str, Any]], loads: dict[str, Any], *,
          title: str, threshold: float) -> None:
  """results.csv, results.md, curves.csv and expert_load.json in directory."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in COLUMNS})
  with open(os.path.join(directory, "curves.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=("cell", "split", "step", "loss"))
    w.writeheader()
    w.writerows(curve_rows)
  with open(os.path.join(directory, "expert_load.json"), "w") as f:
    json.dump(loads, f, indent=1)
  with open(os.path.join(directory, "results.md"), "w") as f:
    f.write(f"# {title}\n\n{markdown_table(rows, threshold)}")


def _parse(value: str) -> Any:
  if value == "":
    return None
  try:
    number = float(value)
  except ValueError:
    return value
  return int(number) if number.is_integer() and "." not in value else number


def load(directory: str) -> tuple[list[dict], list[dict], dict]:
  """(rows, curve rows, expert loads) as `write` left them in directory."""
  def read_csv(name):
    with open(os.path.join(directory, name), newline="") as f:
      return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]
  rows = read_csv("results.csv")
  for r in rows:  # names and series stay strings even when they look numeric
    r["cell"] = str(r["cell"])
    r["series"] = "" if r["series"] is None else str(r["series"])
  curve_rows = read_csv("curves.csv")
  for r in curve_rows:
    r["cell"] = str(r["cell"])
  with open(os.path.join(directory, "expert_load.json")) as f:
    loads = json.load(f)
  return rows, curve_rows, loads
