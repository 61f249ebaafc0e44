"""The reproduction's nine findings: which cells each trains, how it is judged.

Every cell is `experiments/repro/protocol.py:switch` plus the overrides in CELLS,
trained once per seed in DIR/<cell>_s<seed> (`run_name`). Seed i of every
cell reads the same data in the same order (data.shuffle_seed is fixed) and
is scored on the same validation tokens, so a finding's unit of evidence is
the per-seed difference between two cells; `switchjax.stats` turns those
into a mean, a 95 % t interval and a verdict (the rule is stated there).

Each `analyse_*` takes {(cell, seed): Run} and returns the finding's record
for findings.json (see `record`); they are pure, so tests feed them
hand-made runs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from switchjax import stats

EXPERIMENT = "experiments/repro/protocol.py"
PRESET = "switch"

# The encoder-decoder cells of finding (e): experiments/repro/protocol.py:encdec.
ENCDEC = {"model.arch": "encoder_decoder", "model.num_encoder_layers": 2,
          "model.num_decoder_layers": 2, "data.inputs_length": 128,
          "data.targets_length": 32, "moe.group_size": 512}
TOP2 = {"moe.router": "gshard", "moe.num_selected": 2}
BF16 = {"model.dtype": "bfloat16"}
EXPERT_COUNTS = (2, 4, 8, 16, 32)
FIRST_COUNTS = (2, 8, 32)  # (b) trains these for every seed before 4 and 16
CAPACITY_FACTORS = (1.0, 1.25, 2.0)
STRESS_LRS = (1e-2, 3e-2)  # (f), (g): 3x and 10x the protocol's rate
STRESS_FRACTION = 5  # stress runs train a fifth of the protocol's steps
# (h): the runs that start from a trained dense run (DIR/dense_s<seed>) train
# a half of the protocol's steps more, each with its own cosine schedule.
CONTINUE_FRACTION = 2
STARTS = {"dense_cont": "train.init_from", "upcycled": "train.upcycle_from"}
# (j): a dense student of the protocol's length distilled from DIR/switch_s<seed>
# (Switch §5: alpha 0.25, started from the teacher's non-expert weights).
DISTILL = {"moe.num_experts": 0, "train.distill_alpha": 0.25,
           "train.distill_init": True}
# (i), (k), (l): fine-tuning from DIR/{dense,switch}_s<seed> on a small task:
# the bundled kjv_books (verse -> book) cut to its first FT_EXAMPLES training
# verses, for 1/FT_FRACTION of the protocol's steps (about five epochs: the
# regime where Switch §4.1 sees sparse models overfit). Switch's recipe:
# dropout 0.1, a constant learning rate; expert dropout 0.1 unless a cell
# sets it.
FT_EXAMPLES = 512
FT_FRACTION = 4
FINETUNE = {"data.name": "kjv_books", "data.train_examples": FT_EXAMPLES,
            "train.schedule": "constant", "train.learning_rate": 1e-3,
            "train.warmup_steps": 0, "model.dropout_rate": 0.1,
            "moe.expert_dropout": 0.1, "train.log_every": 10}
# Fine-tuning cell -> the protocol cell whose run it starts from.
FT_SOURCES = {"ft_dense": "dense", "ft_switch": "switch",
              "ft_switch_ed": "switch", "ft_only_moe": "switch",
              "ft_only_non_moe": "switch"}
# Overrides that make a run start from another run's workdir.
START_KEYS = (*STARTS.values(), "train.distill_from")


def _stress(router_dtype: str, init: float, lr: float) -> dict[str, Any]:
  return {**BF16, "moe.router_dtype": router_dtype, "model.init_scale": init,
          "train.learning_rate": lr}


def stress_cell(router_dtype: str, init: float, lr: float) -> str:
  return f"bf16_router{router_dtype[-2:]}_init{init}_lr{lr:g}"


CELLS: dict[str, dict[str, Any]] = {
    "dense": {"moe.num_experts": 0},
    "switch": {},
    # The dense model trained on twice the tokens (its own cosine schedule):
    # the speedup reads where the dense loss-vs-tokens line meets Switch's.
    "dense_2x": {"moe.num_experts": 0},  # 2x steps: `cell_overrides`
    **{f"e{n}": {"moe.num_experts": n} for n in EXPERT_COUNTS if n != 8},
    **{f"cf{f}": {"moe.train_capacity_factor": f}
       for f in CAPACITY_FACTORS if f != 2.0},
    "top2": TOP2,
    # (h) Sparse upcycling: the dense run continued, or made a top-2 MoE
    # whose experts start as its FFNs (its combine weights sum to 1, so the
    # MoE computes the dense model at its first step); `cell_overrides`.
    "dense_cont": {"moe.num_experts": 0},
    "upcycled": TOP2,
    "distilled": DISTILL,  # + train.distill_from: `cell_overrides`
    # The student's start without the teacher's targets (alpha 0): what the
    # teacher's non-expert weights alone give it.
    "distill_start": {**DISTILL, "train.distill_alpha": 0.0},
    "ft_dense": {**FINETUNE, "moe.num_experts": 0},
    "ft_switch": FINETUNE,
    "ft_switch_ed": {**FINETUNE, "moe.expert_dropout": 0.4},  # Switch Table 4
    "ft_only_moe": {**FINETUNE, "train.freeze": "non_experts"},
    "ft_only_non_moe": {**FINETUNE, "train.freeze": "moe"},
    "ed_top2": {**ENCDEC, **TOP2},
    "ed_ec": {**ENCDEC, **TOP2, "moe.encoder_router": "expert_choice"},
    **{stress_cell(dt, init, lr): _stress(dt, init, lr)
       for lr in STRESS_LRS for dt, init in (("float32", 0.1), ("bfloat16", 0.1),
                                             ("float32", 1.0))},
}


def needs_dense_2x(runs: Runs, seeds: Sequence[int]) -> bool:
  """Whether the speedup needs the dense runs at 2x the tokens: only where
  Switch beats dense at 1x in some seed (else it is bounded by 1 without)."""
  return any(runs[("switch", s)].eval_loss < runs[("dense", s)].eval_loss
             for s in seeds)


def cell_overrides(cell: str, steps: int, seed: int = 0,
                   workdir: str = "") -> dict[str, Any]:
  """A cell's overrides for a protocol of `steps` training steps; the cells
  of (h) start from DIR/dense_s<seed> (DIR = `workdir`)."""
  out = dict(CELLS[cell])
  if cell == "dense_2x":
    out["train.num_steps"] = 2 * steps
  elif cell.startswith("bf16_"):
    n = max(2, steps // STRESS_FRACTION)
    out.update({"train.num_steps": n, "train.warmup_steps": n // 10,
                "train.eval_every": n, "train.checkpoint_every": n})
  elif cell in ("distilled", "distill_start"):
    out["train.distill_from"] = os.path.join(workdir, run_name("switch", seed))
  elif cell in FT_SOURCES:
    n = max(2, steps // FT_FRACTION)
    out.update({"train.init_from": os.path.join(
        workdir, run_name(FT_SOURCES[cell], seed)), "train.num_steps": n,
                "train.eval_every": max(1, n // 2), "train.checkpoint_every": n})
  elif cell in STARTS:
    n = max(2, steps // CONTINUE_FRACTION)
    out.update({STARTS[cell]: os.path.join(workdir, run_name("dense", seed)),
                "train.num_steps": n, "train.warmup_steps": n // 10})
  return out


def expert_cell(n: int) -> str:
  return {0: "dense", 1: "dense", 8: "switch"}.get(n, f"e{n}")


def cf_cell(f: float) -> str:
  return "switch" if f == 2.0 else f"cf{f}"


def run_name(cell: str, seed: int) -> str:
  return f"{cell}_s{seed}"


@dataclasses.dataclass
class Run:
  """What a finding reads of one finished (or diverged) run."""
  eval_loss: float  # last eval; nan if it diverged
  curve: Sequence[tuple[float, float]] = ()  # (tokens seen, eval loss)
  dropped_pct: float = 0.0  # mean train dropped fraction over the run, %
  late_dropped_pct: float = math.nan  # the same over its second half, %
  eval_dropped_pct: float = 0.0  # at the last eval, %
  tokens_per_sec: float = math.nan
  diverged: bool = False
  max_grad_norm: float = math.nan
  router_z_loss: float = math.nan  # last train log: mean logsumexp^2 of router logits
  late_train_loss: float = math.nan  # mean logged train loss, last quarter
  exact_match: float = math.nan  # a task's, at the last eval


Runs = Mapping[tuple[str, int], Run]


class Missing(Exception):
  """A finding's runs have not finished."""


def _get(runs: Runs, cell: str, seeds: Sequence[int]) -> list[Run]:
  missing = [run_name(cell, s) for s in seeds if (cell, s) not in runs]
  if missing:
    raise Missing(", ".join(missing))
  return [runs[(cell, s)] for s in seeds]


def _losses(runs: Runs, cell: str, seeds: Sequence[int]) -> list[float]:
  return [r.eval_loss for r in _get(runs, cell, seeds)]


def record(finding: str, cells: Sequence[str], seeds: Sequence[int],
           values: Mapping[str, Sequence[float]], diffs: Sequence[float],
           paper_sign: int, what: str, **extra) -> dict[str, Any]:
  """One finding's findings.json entry: per-seed values, the paired mean
  difference, its 95 % interval and the verdict."""
  interval = stats.t_interval(diffs)
  return {"id": finding, "cells": list(cells), "seeds": list(seeds),
          "values": {k: [float(v) for v in vs] for k, vs in values.items()},
          "difference": what, "per_seed_difference": [float(d) for d in diffs],
          "mean_difference": interval.mean,
          "interval_95": [interval.low, interval.high],
          "paper_sign": paper_sign,
          "verdict": stats.verdict(interval, paper_sign), **extra}


def _pair(finding: str, runs: Runs, seeds: Sequence[int], a: str, b: str,
          what: str, paper_sign: int = -1, **extra) -> dict[str, Any]:
  """Cell a against cell b, seed by seed: eval loss of a - b (paper: < 0
  unless `paper_sign` says > 0)."""
  la, lb = _losses(runs, a, seeds), _losses(runs, b, seeds)
  return record(finding, [a, b], seeds, {a: la, b: lb},
                [x - y for x, y in zip(la, lb)], paper_sign, what, **extra)


def _speedup(dense: Run, dense_2x: Run, target: Run, tokens: float
             ) -> tuple[float, str]:
  """(dense tokens to reach `target`'s final loss / `tokens`, its bound).

  From the dense model's final losses at 1x and 2x the tokens (each run
  annealed to its own end), interpolated in log tokens: "exact". When
  dense at 2x does not get there the ratio is 2, a "lower" bound. When
  Switch is no better than dense at 1x, the dense run's own eval curve says
  where it got there: an "upper" bound, since an eval midway through a
  cosine schedule sits above a run annealed at that length.
  """
  if target.eval_loss >= dense.eval_loss:
    if not dense.curve:
      return 1.0, "upper"
    t, losses = zip(*dense.curve)
    reached = stats.tokens_to_reach(t, losses, target.eval_loss)
    return min(1.0, (reached or tokens) / tokens), "upper"
  ratio, exact = stats.speedup([tokens, 2 * tokens],
                               [dense.eval_loss, dense_2x.eval_loss],
                               target.eval_loss, tokens)
  return ratio, "exact" if exact else "lower"


def gap_over_training(a: Sequence[Run], b: Sequence[Run]) -> list[dict]:
  """Paired eval-loss difference a - b at every token count both curves
  share (each run evaluated at the same steps), with its 95 % interval."""
  shared = set.intersection(*(set(t for t, _ in r.curve) for r in (*a, *b)))
  out = []
  for t in sorted(shared):
    diffs = [dict(x.curve)[t] - dict(y.curve)[t] for x, y in zip(a, b)]
    iv = stats.t_interval(diffs)
    out.append({"tokens": float(t), "per_seed": [float(d) for d in diffs],
                "mean": iv.mean, "interval_95": [iv.low, iv.high]})
  return out


def analyse_a(runs: Runs, seeds: Sequence[int], tokens: float,
              step_ms: Optional[Mapping[str, float]] = None) -> dict:
  """Switch vs FLOP-matched dense at equal tokens; speedup in tokens and in
  time (step times from the benchmark when given, else the runs' own
  throughput, which a shared machine makes noisy)."""
  out = _pair("a", runs, seeds, "switch", "dense", "eval loss, Switch - dense")
  dense, switch = _get(runs, "dense", seeds), _get(runs, "switch", seeds)
  # Whether the gap closes as tokens grow: what a longer run would change.
  out["gap_over_training"] = gap_over_training(switch, dense)
  # Where Switch is no better than dense at 1x the ratio is known (<= 1)
  # without the 2x runs.
  if (not needs_dense_2x(runs, seeds)
      or all((("dense_2x", s) in runs) for s in seeds)):
    long = [runs.get(("dense_2x", s), Run(math.nan)) for s in seeds]
    ups = [_speedup(d, l, s, tokens) for d, l, s in zip(dense, long, switch)]
    ratios = [u for u, _ in ups]
    if step_ms and "dense" in step_ms and "switch" in step_ms:
      speed = [step_ms["dense"] / step_ms["switch"]] * len(seeds)
    else:
      speed = [s.tokens_per_sec / d.tokens_per_sec
               for s, d in zip(switch, dense)]
    time_ratios = [u * v for u, v in zip(ratios, speed)]
    tokens_iv, time_iv = stats.t_interval(ratios), stats.t_interval(time_ratios)
    out["speedup"] = {
        "tokens": ratios, "bound": [b for _, b in ups],
        "tokens_mean": tokens_iv.mean,
        "tokens_interval_95": [tokens_iv.low, tokens_iv.high],
        "wall_clock": time_ratios, "wall_clock_mean": time_iv.mean,
        "wall_clock_interval_95": [time_iv.low, time_iv.high],
        "dense_2x": [r.eval_loss for r in long]}  # nan: not run
  return out


def slope_per_doubling(counts: Sequence[int], losses: Sequence[float]) -> float:
  """Least-squares slope of loss against log2(experts): nats per doubling."""
  x = np.log2(np.asarray(counts, np.float64))
  return float(np.polyfit(x, np.asarray(losses, np.float64), 1)[0])


def analyse_b(runs: Runs, seeds: Sequence[int]) -> dict:
  """Loss vs experts 1 (dense) .. 32 at equal active FLOPs (Switch Fig. 4)."""
  # Every count whose runs finished for all seeds; dense (1) and at least
  # two sparse counts are needed (the extremes train first: FIRST_COUNTS).
  counts = tuple(n for n in (1,) + EXPERT_COUNTS
                 if all((expert_cell(n), s) in runs for s in seeds))
  if 1 not in counts or len(counts) < 3:
    _get(runs, "dense", seeds)
    for n in EXPERT_COUNTS:
      _get(runs, expert_cell(n), seeds)
  values = {str(n): _losses(runs, expert_cell(n), seeds) for n in counts}
  def slopes(ns):
    return [slope_per_doubling(ns, [values[str(n)][i] for n in ns])
            for i in range(len(seeds))]
  # The sparse counts alone: whether more experts help once a layer is
  # sparse, apart from what making it sparse costs against dense.
  sparse = stats.t_interval(slopes([n for n in counts if n > 1]))
  return record("b", [expert_cell(n) for n in counts], seeds, values,
                slopes(counts), -1,
                "slope of eval loss per doubling of experts (1 = dense)",
                sparse_slope={"mean": sparse.mean,
                              "interval_95": [sparse.low, sparse.high]})


def analyse_c(runs: Runs, seeds: Sequence[int],
              step_ms: Optional[Mapping[str, float]] = None) -> dict:
  """Capacity factor 1.0 / 1.25 / 2.0: drops, quality, step cost."""
  cells = [cf_cell(f) for f in CAPACITY_FACTORS]
  got = {c: _get(runs, c, seeds) for c in cells}
  lo, hi = got[cells[0]], got[cells[-1]]
  return record(
      "c", cells, seeds, {c: [r.eval_loss for r in rs] for c, rs in got.items()},
      [h.eval_loss - l.eval_loss for h, l in zip(hi, lo)], -1,
      "eval loss, capacity factor 2.0 - 1.0",
      dropped_pct={c: [r.dropped_pct for r in rs] for c, rs in got.items()},
      late_dropped_pct={c: [r.late_dropped_pct for r in rs]
                        for c, rs in got.items()},
      eval_dropped_pct={c: [r.eval_dropped_pct for r in rs]
                        for c, rs in got.items()},
      drops_fall=bool(all(
          np.mean([r.dropped_pct for r in got[b]])
          < np.mean([r.dropped_pct for r in got[a]])
          for a, b in zip(cells, cells[1:]))),
      step_ms=dict(step_ms or {}))


def analyse_d(runs: Runs, seeds: Sequence[int],
              step_ms: Optional[Mapping[str, float]] = None) -> dict:
  """Top-2 vs top-1 at equal steps; per second from the step-time benchmark."""
  out = _pair("d", runs, seeds, "top2", "switch",
              "eval loss at equal steps, top-2 - top-1")
  if step_ms and "top2" in step_ms and "switch" in step_ms:
    out["step_time_ratio"] = step_ms["top2"] / step_ms["switch"]
  return out


def analyse_e(runs: Runs, seeds: Sequence[int]) -> dict:
  """Expert choice (encoder) vs top-2 token choice, encoder-decoder."""
  return _pair("e", runs, seeds, "ed_ec", "ed_top2",
               "eval loss, expert choice - top-2")


def analyse_h(runs: Runs, seeds: Sequence[int]) -> dict:
  """Upcycled top-2 MoE vs the dense run continued, both from the same
  dense run for the same extra tokens; the MoE from scratch beside them."""
  out = _pair("h", runs, seeds, "upcycled", "dense_cont",
              f"eval loss after 1/{CONTINUE_FRACTION} more of the protocol's "
              "tokens, upcycled - continued dense")
  out["values"]["dense"] = _losses(runs, "dense", seeds)  # where both start
  out["values"]["top2"] = _losses(runs, "top2", seeds)  # from scratch, 1x
  return out


def analyse_j(runs: Runs, seeds: Sequence[int]) -> dict:
  """The distilled dense student against the dense model trained alone; the
  fraction of the teacher's gain it keeps, where the teacher has one."""
  out = _pair("j", runs, seeds, "distilled", "dense",
              "eval loss, distilled dense student - dense")
  dense, switch, student = (_losses(runs, c, seeds)
                            for c in ("dense", "switch", "distilled"))
  out["values"]["switch"] = switch
  gains = [d - s for d, s in zip(dense, switch)]
  out["teacher_gain"] = [float(g) for g in gains]
  # Switch Table 6: (dense - student) / (dense - teacher), ~30 %. Only where
  # the teacher beats dense in every seed: a ratio over ~0 means nothing.
  out["kept_fraction"] = ([float((d - x) / g) for d, x, g in
                           zip(dense, student, gains)]
                          if all(g > 0 for g in gains) else None)
  # The student starts from the teacher's trained non-expert weights: the
  # same start trained on the labels alone separates the targets' effect.
  try:
    alone = _pair("j", runs, seeds, "distilled", "distill_start",
                  "eval loss, distilled - same start without the teacher")
    out["targets_effect"] = {k: alone[k] for k in (
        "per_seed_difference", "mean_difference", "interval_95", "verdict")}
    out["values"]["distill_start"] = alone["values"]["distill_start"]
  except Missing:
    out["targets_effect"] = None
  return out


def _exact_match(runs: Runs, cells: Sequence[str],
                 seeds: Sequence[int]) -> dict[str, list[float]]:
  return {c: [r.exact_match for r in _get(runs, c, seeds)] for c in cells}


def analyse_i(runs: Runs, seeds: Sequence[int],
              step_ms: Optional[Mapping[str, float]] = None) -> dict:
  """Fine-tuning only the MoE layers, or only the rest, against all."""
  cells = ("ft_only_moe", "ft_only_non_moe", "ft_switch")
  out = _pair("i", runs, seeds, "ft_only_moe", "ft_switch",
              "validation loss after fine-tuning, only the MoE layers "
              "trained - all trained", paper_sign=+1)
  rest = [x - y for x, y in zip(_losses(runs, "ft_only_non_moe", seeds),
                                _losses(runs, "ft_switch", seeds))]
  iv = stats.t_interval(rest)
  out["values"]["ft_only_non_moe"] = _losses(runs, "ft_only_non_moe", seeds)
  out["only_non_moe_difference"] = {
      "per_seed": [float(d) for d in rest], "mean": iv.mean,
      "interval_95": [iv.low, iv.high]}
  out["exact_match"] = _exact_match(runs, cells, seeds)
  bench = {c: step_ms[v] for c, v in (("ft_switch", "switch"),
                                      ("ft_only_moe", "freeze_non_experts"),
                                      ("ft_only_non_moe", "freeze_moe"))
           if step_ms and v in step_ms}
  if bench:
    out["step_ms"] = bench
  return out


def overfit_gap(run: Run) -> float:
  """Validation loss minus the train loss late in fine-tuning (nats)."""
  return run.eval_loss - run.late_train_loss


def analyse_k(runs: Runs, seeds: Sequence[int]) -> dict:
  """Fine-tuned on a small task, does Switch's train/validation gap grow
  more than the dense model's (both from protocol runs of equal length;
  `pretrained` records how close in quality they start)?"""
  cells = ("ft_switch", "ft_dense")
  got = {c: _get(runs, c, seeds) for c in cells}
  gaps = {c: [overfit_gap(r) for r in rs] for c, rs in got.items()}
  return record(
      "k", cells, seeds, {c: [r.eval_loss for r in rs] for c, rs in got.items()},
      [s - d for s, d in zip(gaps["ft_switch"], gaps["ft_dense"])], +1,
      "validation - train loss after fine-tuning, Switch - dense",
      gap=gaps, train_loss={c: [r.late_train_loss for r in rs]
                            for c, rs in got.items()},
      exact_match=_exact_match(runs, cells, seeds),
      pretrained={c: _losses(runs, FT_SOURCES[c], seeds) for c in cells})


def analyse_l(runs: Runs, seeds: Sequence[int]) -> dict:
  """Expert dropout 0.4 against 0.1 when fine-tuning Switch (Table 4)."""
  out = _pair("l", runs, seeds, "ft_switch_ed", "ft_switch",
              "validation loss after fine-tuning, expert dropout 0.4 - 0.1")
  out["exact_match"] = _exact_match(runs, ("ft_switch_ed", "ft_switch"), seeds)
  return out


def _stress_summary(runs: Runs, seeds, router_dtype, init) -> dict[str, Any]:
  out = {}
  for lr in STRESS_LRS:
    rs = _get(runs, stress_cell(router_dtype, init, lr), seeds)
    out[f"{lr:g}"] = {
        "diverged": sum(r.diverged for r in rs),
        "eval_loss": [r.eval_loss for r in rs],
        "max_grad_norm": [r.max_grad_norm for r in rs],
        "router_z_loss": [r.router_z_loss for r in rs]}
  return out


def _stress_record(finding, runs, seeds, stable, unstable, what) -> dict:
  """Paper: `unstable` diverges more, or trains worse. The interval is over
  the per-seed eval-loss differences at the lowest stress rate; when a run
  there diverged (no loss), the verdict is the sign of the summed per-seed
  divergence counts (unstable - stable, over every stress rate) instead."""
  a, b = (_stress_summary(runs, seeds, *stable),
          _stress_summary(runs, seeds, *unstable))
  diffs = []
  for s in seeds:
    d = 0.0
    for lr in STRESS_LRS:
      d += (runs[(stress_cell(*unstable, lr), s)].diverged
            - runs[(stress_cell(*stable, lr), s)].diverged)
    diffs.append(d)
  lr = STRESS_LRS[0]
  la, lb = (_losses(runs, stress_cell(*stable, lr), seeds),
            _losses(runs, stress_cell(*unstable, lr), seeds))
  loss_diff = [y - x for x, y in zip(la, lb)]
  finite = all(math.isfinite(v) for v in loss_diff)
  out = record(finding, [stress_cell(*unstable, lr), stress_cell(*stable, lr)],
               seeds, {"stable": la, "unstable": lb},
               loss_diff if finite else [0.0] * len(seeds), +1,
               f"eval loss at lr {lr:g}, {what}", by_lr={
                   "stable": a, "unstable": b},
               diverged_difference=diffs)
  if not finite:
    out["verdict"] = ("agrees" if sum(diffs) > 0 else
                      "disagrees" if sum(diffs) < 0 else "inconclusive")
    out["difference"] += " (diverged runs: verdict from divergence counts)"
  return out


def analyse_f(runs: Runs, seeds: Sequence[int]) -> dict:
  """bfloat16 model: a bfloat16 router vs a float32 one under stress."""
  return _stress_record("f", runs, seeds, ("float32", 0.1),
                        ("bfloat16", 0.1), "bfloat16 router - float32 router")


def analyse_g(runs: Runs, seeds: Sequence[int]) -> dict:
  """bfloat16 model: init scale 1.0 vs 0.1 under stress."""
  return _stress_record("g", runs, seeds, ("float32", 0.1), ("float32", 1.0),
                        "init 1.0 - init 0.1")


@dataclasses.dataclass(frozen=True)
class Finding:
  """A claim, its cells and its analysis. `tiers` orders training: every
  seed of every finding's first tier before any finding's next tier."""
  id: str
  claim: str
  tiers: tuple[tuple[str, ...], ...]
  analyse: Callable[..., dict]

  @property
  def cells(self) -> tuple[str, ...]:
    return tuple(c for tier in self.tiers for c in tier)


FINDINGS: dict[str, Finding] = {f.id: f for f in (
    Finding("a", "Switch beats the FLOP-matched dense model at equal tokens "
            "(Switch §3, Table 1, Fig. 1)", (("dense", "switch"), ("dense_2x",)),
            analyse_a),
    Finding("b", "More experts give a lower loss at equal active FLOPs "
            "(Switch Fig. 4)",
            (tuple(dict.fromkeys(expert_cell(n) for n in (1,) + FIRST_COUNTS)),
             tuple(expert_cell(n) for n in EXPERT_COUNTS
                   if n not in FIRST_COUNTS)), analyse_b),
    Finding("c", "A larger capacity factor drops fewer tokens and improves "
            "quality per step, at a cost in speed (Switch Table 1)",
            (tuple(cf_cell(f) for f in CAPACITY_FACTORS),), analyse_c),
    Finding("d", "Top-2 is a little better per step than top-1, top-1 faster "
            "(Switch Table 1)", (("switch", "top2"),), analyse_d),
    Finding("e", "Expert choice beats token choice at equal compute "
            "(Zhou et al. 2022)", (("ed_top2", "ed_ec"),), analyse_e),
    Finding("f", "A float32 router is needed for bfloat16 stability "
            "(Switch Table 2)",
            (tuple(stress_cell(dt, 0.1, lr) for lr in STRESS_LRS
                   for dt in ("float32", "bfloat16")),), analyse_f),
    Finding("g", "Init scale 0.1 is more stable than 1.0 (Switch Table 3)",
            (tuple(stress_cell("float32", init, lr) for lr in STRESS_LRS
                   for init in (0.1, 1.0)),), analyse_g),
    Finding("h", "Sparse upcycling beats continuing the dense run for the "
            "same extra tokens (Komatsuzaki et al. 2022)",
            (("dense", "top2"), ("dense_cont", "upcycled")), analyse_h),
    Finding("i", "Fine-tuning only the MoE layers is worse than fine-tuning "
            "everything; fine-tuning all but them is about as good (ST-MoE "
            "§4.4, Fig. 6)", (("switch",), ("ft_switch", "ft_only_moe",
                                             "ft_only_non_moe")), analyse_i),
    Finding("j", "A dense student distilled from a Switch teacher beats the "
            "dense model trained alone (Switch §5, Table 6: ~30 % of the "
            "teacher's gain kept)", (("dense", "switch"),
                                     ("distilled", "distill_start")),
            analyse_j),
    Finding("k", "Fine-tuned on a small task, a sparse model overfits more "
            "than a dense one pre-trained as long (Switch §4.1)",
            (("dense", "switch"), ("ft_dense", "ft_switch")), analyse_k),
    Finding("l", "Expert dropout 0.4 fine-tunes better than 0.1 (Switch "
            "§4.1, Table 4)", (("switch",), ("ft_switch", "ft_switch_ed")),
            analyse_l),
)}
