"""The reproduction's report: docs/results.md and its figures.

`write(workdir, results, runs, bench, meta, base)` draws the figures into
workdir and writes the markdown; `scripts/reproduce.py` calls it with the
findings' records (switchjax/findings.py) and the runs they came from.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from switchjax import findings as F
from switchjax import results as results_lib
from switchjax import stats

PROBE_BATCHES = 16  # validation batches the specialisation probe routes
# The finding whose runs each figure is drawn from.
FIGURE_FINDING = {"loss_vs_tokens.png": "a", "loss_vs_experts.png": "b",
                  "speedup.png": "a", "capacity_factor.png": "c",
                  "specialisation.png": "a"}
FIGURES = tuple(FIGURE_FINDING)


def _seeds_of(runs: F.Runs, cell: str) -> list[int]:
  return sorted(s for c, s in runs if c == cell)


def _band(runs: F.Runs, cell: str):
  """(tokens, mean, low, high) of the eval curves of a cell over its seeds."""
  curves = [runs[(cell, s)].curve for s in _seeds_of(runs, cell)
            if not runs[(cell, s)].diverged]
  if not curves:
    return None
  n = min(len(c) for c in curves)
  tokens = np.array([point[0] for point in curves[0][:n]])
  losses = np.array([[c[i][1] for i in range(n)] for c in curves])
  return tokens, losses.mean(0), losses.min(0), losses.max(0)


def fig_loss_vs_tokens(runs: F.Runs) -> Optional[Figure]:
  fig = Figure(figsize=(7, 4.5), layout="constrained")
  ax = fig.add_subplot()
  drawn = False
  for i, (cell, label) in enumerate((("dense", "dense"),
                                     ("switch", "Switch, 8 experts"),
                                     ("dense_2x", "dense, 2x tokens"))):
    band = _band(runs, cell)
    if band is None:
      continue
    t, mean, low, high = band
    n = len(_seeds_of(runs, cell))
    ax.plot(t, mean, "o-", ms=3, color=f"C{i}", label=f"{label} ({n} seeds)")
    ax.fill_between(t, low, high, color=f"C{i}", alpha=0.25, lw=0)
    drawn = True
  if not drawn:
    return None
  ax.set_xscale("log")
  ax.set_xlabel("training tokens")
  ax.set_ylabel("eval loss (nats / token, whole validation split)")
  ax.set_title("Eval loss vs tokens: mean over seeds, band = min..max")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  return fig


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
  iv = stats.t_interval(values)
  return iv.mean, (iv.high - iv.mean if math.isfinite(iv.high) else 0.0)


def fig_loss_vs_experts(record: dict) -> Optional[Figure]:
  if record.get("verdict") == "pending":
    return None
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.add_subplot()
  counts = [int(k) for k in record["values"]]
  means, cis = zip(*(_mean_ci(record["values"][str(n)]) for n in counts))
  ax.errorbar(counts, means, yerr=cis, fmt="o-", capsize=3)
  ax.set_xscale("log", base=2)
  ax.set_xticks(counts, ["1 (dense)"] + [str(n) for n in counts[1:]])
  ax.set_xlabel("experts (equal active FLOPs)")
  ax.set_ylabel("eval loss")
  lo, hi = record["interval_95"]
  ax.set_title(f"Loss vs experts (Switch Fig. 4): {record['mean_difference']:+.4f}"
               f" nats / doubling [{lo:+.4f}, {hi:+.4f}]", fontsize=9)
  ax.grid(alpha=0.3)
  return fig


def fig_speedup(record: dict, tokens: float) -> Optional[Figure]:
  up = record.get("speedup")
  if not up or not all(math.isfinite(x) for x in up["dense_2x"]):
    return None  # the 2x dense runs are what the figure shows
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.add_subplot()
  for i, (d1, d2, s) in enumerate(zip(record["values"]["dense"],
                                      up["dense_2x"], record["values"]["switch"])):
    ax.plot([tokens, 2 * tokens], [d1, d2], "o-", color=f"C{i}",
            label=f"dense, seed {record['seeds'][i]}")
    ax.axhline(s, ls="--", color=f"C{i}", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("dense training tokens (each run annealed to its end)")
  ax.set_ylabel("final eval loss")
  lo, hi = up["tokens_interval_95"]
  ax.set_title(f"Switch's final loss (dashed) reached by dense at "
               f"{up['tokens_mean']:.2f}x the tokens [{lo:.2f}, {hi:.2f}]",
               fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  return fig


def fig_capacity(record: dict) -> Optional[Figure]:
  if record.get("verdict") == "pending":
    return None
  fig = Figure(figsize=(9, 3.6), layout="constrained")
  factors = list(F.CAPACITY_FACTORS)
  cells = [F.cf_cell(f) for f in factors]
  for j, (key, title) in enumerate((
      ("dropped_pct", "train tokens dropped (%, mean over the run)"),
      ("values", "eval loss"))):
    ax = fig.add_subplot(1, 2, j + 1)
    means, cis = zip(*(_mean_ci(record[key][c]) for c in cells))
    ax.errorbar(factors, means, yerr=cis, fmt="o-", capsize=3)
    ax.set_xlabel("train capacity factor")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
  return fig


def fig_specialisation(spec: dict) -> Optional[Figure]:
  if not spec:
    return None
  layers = spec["layers"]
  fig = Figure(figsize=(7, 1.5 + 1.0 * len(layers)), layout="constrained")
  ax = fig.add_subplot()
  bible = np.array([[e[0] for e in layer] for layer in spec["fractions"]])
  im = ax.imshow(bible, aspect="auto", cmap="coolwarm", vmin=0, vmax=1)
  ax.set_yticks(range(len(layers)), layers, fontsize=8)
  ax.set_xticks(range(bible.shape[1]))
  ax.set_xlabel("expert")
  ax.set_title(f"Fraction of each expert's validation tokens from the Bible "
               f"(all tokens: {spec['bible_share']:.2f})", fontsize=9)
  fig.colorbar(im, ax=ax)
  return fig


def specialisation(workdir: str, seeds: Sequence[int]) -> dict:
  """Routing by domain of the Switch run of the first seed (cached in
  DIR/specialisation.json); {} when that run has not finished."""
  path = os.path.join(workdir, "specialisation.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  run_dir = os.path.join(workdir, F.run_name("switch", seeds[0]))
  if not os.path.exists(os.path.join(run_dir, "config.json")):
    return {}
  import ml_collections  # pylint: disable=g-import-not-at-top
  from switchjax import results  # pylint: disable=g-import-not-at-top
  from switchjax import routing_probe as rp  # pylint: disable=g-import-not-at-top
  from switchjax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(run_dir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if not results.is_finished(run_dir, config.train.num_steps):
    return {}
  try:
    p = rp.probe(config, run_dir, max_batches=PROBE_BATCHES)
  except Exception as e:  # pylint: disable=broad-except
    print(f"specialisation skipped: {run_dir} does not restore ({e})")
    return {}
  vocab = vocab_lib.get_vocabulary(config)
  e = config.moe.num_experts
  fractions = rp.domain_fractions(p, e)
  spec = {
      "run": F.run_name("switch", seeds[0]), "layers": p.layers,
      "tokens": int(p.tokens.size),
      "bible_share": float(np.mean(p.domains == 0)),
      "fractions": fractions.tolist(),
      "share": [np.bincount(c, minlength=e).tolist() for c in p.choice],
      "top_tokens": [[[vocab.decode([t]) for t in rp.top_tokens(p, l, x)]
                      for x in range(e)] for l in range(len(p.layers))],
      "bf16_mismatch": p.bf16_mismatch}
  with open(path, "w") as f:
    json.dump(spec, f, indent=1)
  return spec


VERDICT_RULE = (
    "Each finding compares cells trained with the same seeds; seed i of "
    "every cell reads the same data in the same order and is scored on the "
    "same tokens (the whole validation split). The evidence is the per-seed "
    "difference; its mean comes with a 95 % t interval over seeds (mean +- "
    "t(0.975, n-1) sd / sqrt(n)). Verdict: **agrees** when the interval "
    "excludes zero on the side the paper predicts, **disagrees** when it "
    "excludes zero on the other side, **inconclusive** otherwise; the effect "
    "size is given either way (switchjax/stats.py).")


def _interval(r: dict) -> str:
  lo, hi = r["interval_95"]
  return f"{r['mean_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _per_seed(r: dict) -> str:
  return ", ".join(f"{d:+.4f}" for d in r["per_seed_difference"])


def findings_table(results: dict[str, dict]) -> list[str]:
  lines = ["| | paper's finding | measured (per seed) | mean difference "
           "[95 % interval] | verdict |", "|---|---|---|---|---|"]
  for f, r in results.items():
    if r["verdict"] == "pending":
      lines.append(f"| ({f}) | {r['claim']} | not run yet ({len(r['missing'])}"
                   f" runs missing: {', '.join(r['missing'][:3])}, ...) | | "
                   "pending |")
      continue
    lines.append(f"| ({f}) | {r['claim']} | {r['difference']}: "
                 f"{_per_seed(r)} (seeds {', '.join(map(str, r['seeds']))}) "
                 f"| {_interval(r)} | **{r['verdict']}** |")
  return lines


def other_seeds_lines(results: dict[str, dict]) -> list[str]:
  """The findings again on the other seeds the workdir holds, and pooled."""
  rows = [(f, r) for f, r in results.items() if r.get("replication")]
  if not rows:
    return []
  lines = ["## On other seeds", "",
           "The same analysis on the seeds the report was made with "
           "(`--seeds`), on the other seeds whose runs the workdir holds "
           "(trained with `--seeds` of their own), and on all seeds pooled, "
           "which is the verdict the findings table gives (the gap over "
           "training and the speedup stay on `--seeds`). A verdict that "
           "changes with the seeds is not yet evidence at that number of "
           "seeds.", "",
           "| | seeds | per seed | mean difference [95 % interval] | "
           "verdict |", "|---|---|---|---|---|"]
  for f, r in rows:
    again = r["replication"]
    for name, x in (("made with", again.get("made_with", r)),
                    ("other", again["other_seeds"]),
                    ("all", again.get("all_seeds"))):
      if x:
        lines.append(f"| ({f}) | {name}: {', '.join(map(str, x['seeds']))} | "
                     f"{_per_seed(x)} | {_interval(x)} | **{x['verdict']}** |")
  lines.append("")
  for f, r in rows:
    power = r["replication"].get("power")
    pooled = r["replication"].get("all_seeds")
    if not power:
      continue
    side = ("agrees" if np.sign(power["effect"]) == r["paper_sign"]
            else "disagrees")
    need = power["seeds_for_90_percent"]
    lines.append(
        f"- ({f}): over all {len(pooled['seeds'])} seeds the per-seed "
        f"difference has mean {power['effect']:+.4f} and sd "
        f"{power['sd']:.4f}. If per-seed differences are normal with these, "
        f"a rerun on {power['seeds']} new seeds has a half-width of "
        f"{power['half_width']:.4f} and gives **{side}** with probability "
        f"{power['resolve_probability']:.2f} (else, nearly always, "
        "inconclusive); a 90 % chance needs "
        + (f"{need} seeds." if need else "more than 1,000 seeds."))
  return lines + [""]


def _details(results: dict[str, dict], bench: dict) -> list[str]:
  out = []
  a = results.get("a", {})
  # Speedup and gap rest on --seeds (the made_with ones when pooled).
  made = ", ".join(map(str, a.get("replication", {}).get(
      "made_with", a).get("seeds", [])))
  if a.get("speedup"):
    up = a["speedup"]
    exact = ""
    if "lower" in up["bound"]:
      exact += (f" ({up['bound'].count('lower')} seeds: dense at 2x did not "
                "get there, the ratio is a lower bound)")
    if "upper" in up["bound"]:
      exact += (f" ({up['bound'].count('upper')} seeds: Switch no better "
                "than dense at equal tokens, so read off the dense run's "
                "own eval curve, whose midway evals are not annealed: an "
                "upper bound)")
    out.append(
        f"- **Speedup (a)**: the dense model needs {up['tokens_mean']:.2f}x "
        f"the tokens [{up['tokens_interval_95'][0]:.2f}, "
        f"{up['tokens_interval_95'][1]:.2f}] to reach Switch's final loss"
        f"{exact}; per unit of wall-clock (times the step-time ratio of "
        f"the benchmark) {up['wall_clock_mean']:.2f}x "
        f"[{up['wall_clock_interval_95'][0]:.2f}, "
        f"{up['wall_clock_interval_95'][1]:.2f}]. Per seed ({made}): "
        + ", ".join(f"{x:.2f}" for x in up["tokens"]) + ".")
  if a.get("gap_over_training"):
    out.append("- **Gap over training (a)**: Switch - dense at each eval, "
               f"mean [95 % interval] over seeds {made}: " + "; ".join(
                   f"{g['tokens'] / 1e6:.2f}M tokens {g['mean']:+.4f} "
                   f"[{g['interval_95'][0]:+.4f}, {g['interval_95'][1]:+.4f}]"
                   for g in a["gap_over_training"])
               + " (midway evals are not annealed).")
  b = results.get("b", {})
  if b.get("values"):
    out.append("- **Experts (b)**: mean eval loss by experts (1 = dense): "
               + ", ".join(f"{n}: {np.mean(v):.4f}"
                           for n, v in b["values"].items())
               + "; the slope is fitted per seed over these counts.")
    if b.get("sparse_slope"):
      sp = b["sparse_slope"]
      out[-1] += (f" Over the sparse counts alone the slope is "
                  f"{sp['mean']:+.4f} [{sp['interval_95'][0]:+.4f}, "
                  f"{sp['interval_95'][1]:+.4f}] per doubling.")
    if b["verdict"] == "inconclusive":
      bound = max(map(abs, b["interval_95"]))
      counts = [int(n) for n in b["values"]]
      doublings = np.log2(max(counts) / min(counts))
      out[-1] += (f" Inconclusive but bounded: at 95 % the slope is no "
                  f"steeper than {bound:.4f} nats per doubling either way "
                  f"({doublings * bound:.3f} from {min(counts)} to "
                  f"{max(counts)} experts) at this budget.")
  c = results.get("c", {})
  if c.get("dropped_pct"):
    out.append("- **Capacity factor (c)**: train tokens dropped (mean over the "
               "run) " + ", ".join(
                   f"cf {f}: {np.mean(c['dropped_pct'][F.cf_cell(f)]):.2f} %"
                   for f in F.CAPACITY_FACTORS)
               + "; over its second half " + ", ".join(
                   f"{np.mean(c['late_dropped_pct'][F.cf_cell(f)]):.2f} %"
                   for f in F.CAPACITY_FACTORS)
               + "; at the last eval " + ", ".join(
                   f"{np.mean(c['eval_dropped_pct'][F.cf_cell(f)]):.2f} %"
                   for f in F.CAPACITY_FACTORS) + ".")
    if c.get("step_ms"):
      out[-1] += " Step time (benchmark, ms): " + ", ".join(
          f"cf {f}: {c['step_ms'].get(F.cf_cell(f), float('nan')):.0f}"
          for f in F.CAPACITY_FACTORS) + "."
  d = results.get("d", {})
  if d.get("step_time_ratio"):
    out.append(f"- **Top-2 (d)**: a top-2 step takes {d['step_time_ratio']:.2f}x "
               "a top-1 step (benchmark), so top-1 is the faster one. Per "
               "unit of time, whether top-2's gain per step outweighs that "
               f"needs a top-1 run {d['step_time_ratio']:.2f}x as long, "
               "which the protocol does not train.")
  h = results.get("h", {})
  if h.get("values", {}).get("dense"):
    v = {k: np.mean(x) for k, x in h["values"].items()}
    out.append(
        f"- **Upcycling (h)**: mean eval loss of the dense runs they start "
        f"from {v['dense']:.4f}; after 1/{F.CONTINUE_FRACTION} more of the "
        f"protocol's tokens (a fresh cosine schedule each), continued dense "
        f"{v['dense_cont']:.4f}, upcycled top-2 MoE {v['upcycled']:.4f}; the "
        f"top-2 MoE from scratch at 1x the tokens {v['top2']:.4f} (Komatsuzaki "
        "et al. compare the upcycled model with the continued dense one at "
        "equal extra compute; the upcycled experts are copies of the dense "
        "FFN, so it computes the dense model at its first step).")
  j = results.get("j", {})
  if j.get("values", {}).get("distilled"):
    v = {k: np.mean(x) for k, x in j["values"].items()}
    kept = j.get("kept_fraction")
    out.append(
        f"- **Distillation (j)**: mean eval loss dense {v['dense']:.4f}, "
        f"Switch teacher {v['switch']:.4f}, distilled dense student "
        f"{v['distilled']:.4f} (alpha 0.25, started from the teacher's "
        "non-expert weights); "
        + ("kept fraction of the teacher's gain per seed: "
           + ", ".join(f"{k:.2f}" for k in kept) + " (Switch Table 6: ~0.3)."
           if kept else "the teacher does not beat dense in every seed, so "
           "the fraction of its gain kept (Switch Table 6) is undefined here.")
        + _targets_effect(j))
  out += _finetuning_lines(results)
  sides = {"f": {"stable": "float32 router", "unstable": "bfloat16 router"},
           "g": {"stable": "init 0.1", "unstable": "init 1.0"}}
  for f in ("f", "g"):
    r = results.get(f, {})
    if r.get("by_lr"):
      parts = []
      for side in ("stable", "unstable"):
        for lr, v in r["by_lr"][side].items():
          parts.append(f"{sides[f][side]}, lr {lr}: {v['diverged']} of "
                       f"{len(v['eval_loss'])} diverged, max grad "
                       f"norm {max(v['max_grad_norm']):.2f}, router z-loss "
                       f"{np.nanmean(v['router_z_loss']):.2f}")
      out.append(f"- **({f}) under stress**: " + "; ".join(parts) + ".")
  if bench.get("peak_gflops"):
    out.append(f"- **Throughput**: this CPU's measured float32 matmul peak is "
               f"{bench['peak_gflops']:.0f} GFLOP/s; " + ", ".join(
                   f"{r['variant']} {r['tokens_per_sec']:.0f} tokens/s = "
                   f"{r['gflops']:.1f} GFLOP/s ({100 * r['mfu']:.0f} %)"
                   for r in bench.get("rows", [])
                   # A frozen step skips weight gradients: its FLOPs are
                   # not the full step's that this line counts.
                   if not r["variant"].startswith("freeze_")) + " (benchmarks/"
               "repro_throughput.py; model FLOPs = matmuls of the active "
               "path, 3x the forward).")
  return out


def _em(r: dict, cell: str) -> str:
  """Mean exact match of a fine-tuning cell, in %."""
  return f"{100 * np.mean(r['exact_match'][cell]):.1f} %"


def _targets_effect(j: dict) -> str:
  """What the teacher's soft targets add beyond the student's head start."""
  head = (" The student starts from the teacher's trained non-expert weights,"
          " as Switch's does, so it has the protocol's training twice")
  t = j.get("targets_effect")
  if not t:
    return head + ("; no run from that start without the teacher's targets "
                   "is in the workdir to tell the two apart.")
  lo, hi = t["interval_95"]
  return (head + f": from that start on the labels alone (alpha 0) the mean "
          f"eval loss is {np.mean(j['values']['distill_start']):.4f}, and the "
          f"teacher's targets change it by {t['mean_difference']:+.4f} "
          f"[{lo:+.4f}, {hi:+.4f}] ({t['verdict']}; per seed "
          + ", ".join(f"{x:+.4f}" for x in t["per_seed_difference"]) + ").")


def _finetuning_lines(results: dict[str, dict]) -> list[str]:
  """Findings (i), (k), (l): what the table's one difference leaves out."""
  out = []
  setup = (f"kjv_books cut to its first {F.FT_EXAMPLES} training verses, "
           f"1/{F.FT_FRACTION} of the protocol's steps")
  k = results.get("k", {})
  if k.get("gap"):
    v = {c: np.mean(x) for c, x in k["values"].items()}
    g = {c: np.mean(x) for c, x in k["gap"].items()}
    pre = {c: np.mean(x) for c, x in k["pretrained"].items()}
    out.append(
        f"- **Fine-tuning (k)** ({setup}): pre-trained eval loss dense "
        f"{pre['ft_dense']:.4f}, Switch {pre['ft_switch']:.4f}; after "
        f"fine-tuning, validation loss dense {v['ft_dense']:.4f}, Switch "
        f"{v['ft_switch']:.4f}; validation - train gap dense "
        f"{g['ft_dense']:+.4f}, Switch {g['ft_switch']:+.4f} (train loss: the "
        f"mean logged over the last quarter, dropout on); exact match dense "
        f"{_em(k, 'ft_dense')}, Switch {_em(k, 'ft_switch')}.")
  l = results.get("l", {})
  if l.get("exact_match"):
    out.append(f"- **Expert dropout (l)**: exact match at expert dropout 0.1 "
               f"{_em(l, 'ft_switch')}, at 0.4 {_em(l, 'ft_switch_ed')}.")
  i = results.get("i", {})
  if i.get("only_non_moe_difference"):
    rest = i["only_non_moe_difference"]
    line = (f"- **Freezing (i)**: only the non-MoE parameters trained - all "
            f"trained {rest['mean']:+.4f} [{rest['interval_95'][0]:+.4f}, "
            f"{rest['interval_95'][1]:+.4f}]; exact match all "
            f"{_em(i, 'ft_switch')}, only MoE {_em(i, 'ft_only_moe')}, all "
            f"but MoE {_em(i, 'ft_only_non_moe')}.")
    if i.get("step_ms"):
      ms = i["step_ms"]
      base = ms.get("ft_switch")
      line += " Step time (benchmark, ms): " + ", ".join(
          f"{name} {ms[c]:.0f}" + (f" ({ms[c] / base:.2f}x)" if base else "")
          for c, name in (("ft_switch", "all"), ("ft_only_moe", "only MoE"),
                          ("ft_only_non_moe", "all but MoE")) if c in ms) + "."
    out.append(line)
  return out


def _specialisation_lines(spec: dict) -> list[str]:
  if not spec:
    return []
  lines = ["", "## Expert specialisation", "",
           f"Run `{spec['run']}`: each validation token ({spec['tokens']:,}) "
           "is counted at the expert its router ranks first; the corpus has "
           f"two domains (Bible {spec['bible_share']:.0%} of these tokens, "
           "Python docs the rest). A bfloat16 router would change the first "
           "choice of " + ", ".join(
               f"{100 * m:.2f} %" for m in spec["bf16_mismatch"])
           + " of tokens in the layers below (finding f's mechanism).", "",
           "![specialisation](FIG/specialisation.png)", "",
           "| layer | expert | tokens | from the Bible | most frequent tokens |",
           "|---|---|---|---|---|"]
  for l, name in enumerate(spec["layers"]):
    for x, frac in enumerate(spec["fractions"][l]):
      toks = " ".join(f"`{t!r}`" for t in spec["top_tokens"][l][x][:6])
      lines.append(f"| {name} | {x} | {spec['share'][l][x]:,} | "
                   f"{frac[0]:.2f} | {toks} |")
  return lines


def write(workdir: str, results: dict[str, dict], runs: F.Runs, bench: dict,
          meta: dict, base, *, path: str = "", figures: str = ".",
          figure_names: Optional[Sequence[str]] = None) -> str:
  """Draws the figures into workdir and writes the report to `path`
  (default workdir/results.md), its figures linked under `figures`: those
  drawn, or `figure_names`."""
  path = path or os.path.join(workdir, "results.md")
  seeds = results[next(iter(results))]["seeds"]
  spec = specialisation(workdir, seeds)
  tokens = base.train.num_steps * results_lib.tokens_per_step(base)
  drawn = {"loss_vs_tokens.png": fig_loss_vs_tokens(runs),
           "loss_vs_experts.png": fig_loss_vs_experts(results.get("b", {"verdict": "pending"})),
           "speedup.png": fig_speedup(results.get("a", {}), tokens),
           "capacity_factor.png": fig_capacity(results.get("c", {"verdict": "pending"})),
           "specialisation.png": fig_specialisation(spec)}
  for name, fig in drawn.items():
    if fig is not None:
      fig.savefig(os.path.join(workdir, name), dpi=90)
    elif os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))  # stale: its data is gone
  lines = [
      "# Reproducing the papers' findings at small scale", "",
      f"Made by `{meta['command']}` on {meta['date']} at commit "
      f"`{meta['commit']}`; {meta['machine']}, JAX {meta['jax']}. Training "
      f"time of the runs in its workdir (measured wall time, over runs, "
      f"resumes and the runs trained side by side): {meta['hours']:.2f} h."
      + (f" {meta['kept']}" if meta.get("kept") else ""),
      "",
      "## Protocol", "",
      f"`experiments/repro/protocol.py`: a decoder-only Switch language model (d_model "
      f"{base.model.d_model}, {base.model.num_decoder_layers} layers, d_ff "
      f"{base.model.d_ff}, {base.moe.num_experts} experts in every other FFN, "
      f"top-1, capacity factor {base.moe.train_capacity_factor}, group "
      f"{base.moe.group_size}) on the bundled corpus (KJV Bible + Python "
      f"docs) with a 2,048-piece vocabulary; {base.train.num_steps} steps of "
      f"{base.train.batch_size} x {base.data.seq_length} tokens "
      f"({tokens / 1e6:.1f}M tokens), AdamW, cosine decay to zero, lr "
      f"{base.train.learning_rate}; eval on the whole validation split. "
      "Every cell is that config with the overrides in "
      "`switchjax/findings.py`.", "",
      "## Verdict rule", "", VERDICT_RULE, "",
      "## Findings", "", *findings_table(results), "", *_details(results, bench),
      "", *other_seeds_lines(results)]
  linked = (figure_names if figure_names is not None else
            [name for name, fig in drawn.items() if fig is not None])
  for name in linked:
    if name != "specialisation.png":
      lines.append(f"![{name[:-4]}]({figures}/{name})")
  lines += _specialisation_lines(spec)
  if meta.get("pilot"):
    lines += ["", meta["pilot"].strip()]
  lines += ["", "Data: `findings.json` (per finding: cells, per-seed values, "
            "mean difference, interval, verdict, seeds).", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines).replace("FIG/", f"{figures}/"))
  return path
