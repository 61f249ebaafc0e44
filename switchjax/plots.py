"""Paper-style figures of a sweep's results (see results.py for the data).

Figures are built with matplotlib's object API (no pyplot state), so they
save the same from a script and display inline in a notebook.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from matplotlib.figure import Figure

_DENSE_LABEL = {"moe.num_experts": {0: "dense"}}


def _finite(value: Any) -> bool:
  return value not in (None, "") and math.isfinite(float(value))


def loss_curves(rows: list[dict], curve_rows: list[dict]) -> Figure:
  """Train loss (lines) and eval loss (dots) vs step, one colour per cell."""
  fig = Figure(figsize=(7, 4.5), layout="constrained")
  ax = fig.add_subplot()
  for i, r in enumerate(rows):
    color = f"C{i % 10}"
    for split, style in (("train", "-"), ("eval", "o")):
      pts = [(c["step"], c["loss"]) for c in curve_rows
             if c["cell"] == r["cell"] and c["split"] == split
             and _finite(c["loss"])]
      if pts:
        steps, losses = zip(*pts)
        ax.plot(steps, losses, style, color=color, ms=4, lw=1.2,
                label=r["cell"] if split == "train" else None)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / target token)")
  ax.set_title("Training loss (lines) and eval loss (dots)")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, ncol=2)
  return fig


def _x_ticks(xs: list[Any], x_key: str) -> tuple[dict[Any, int], list[str]]:
  """Categorical x: evenly spaced, in order, labelled with the values."""
  order = sorted(set(xs), key=lambda v: (isinstance(v, str), v))
  names = _DENSE_LABEL.get(x_key, {})
  return ({v: i for i, v in enumerate(order)},
          [str(names.get(v, v)) for v in order])


PANELS = (("eval_loss", "final eval loss"),
          ("dropped_pct", "tokens dropped (%, train)"),
          ("tokens_per_sec", "tokens / s"))


def versus_axis(rows: list[dict], x_key: str) -> Figure:
  """Final eval loss, dropped tokens and speed vs the swept axis.

  One line per series (the cell's labels on the other axes); extra cells
  (no x, e.g. the dense baseline) are dashed horizontal lines.
  """
  fig = Figure(figsize=(12, 3.8), layout="constrained")
  swept = [r for r in rows if r.get("x") not in (None, "")]
  extra = [r for r in rows if r.get("x") in (None, "")]
  pos, labels = _x_ticks([r["x"] for r in swept], x_key)
  series = list(dict.fromkeys(r["series"] for r in swept))
  for j, (key, title) in enumerate(PANELS):
    ax = fig.add_subplot(1, len(PANELS), j + 1)
    for i, s in enumerate(series):
      pts = sorted((pos[r["x"]], float(r[key])) for r in swept
                   if r["series"] == s and _finite(r.get(key)))
      if pts:
        ax.plot(*zip(*pts), "o-", color=f"C{i}", label=s or "swept")
    for i, r in enumerate(extra):
      if _finite(r.get(key)):
        ax.axhline(float(r[key]), ls="--", color=f"C{len(series) + i}",
                   label=r["cell"])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(x_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if j == 0 and ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return fig


def expert_load(loads: dict[str, dict[str, list[float]]]) -> Figure:
  """Per cell, a layers x experts heatmap of E x load (1 = balanced)."""
  cells = [c for c, layers in loads.items() if layers]
  n = max(1, len(cells))
  cols = min(n, 4)
  rows = math.ceil(n / cols)
  fig = Figure(figsize=(3.6 * cols, 1.2 + 1.1 * rows * 2), layout="constrained")
  if not cells:
    fig.add_subplot().text(0.5, 0.5, "no sparse layers", ha="center")
    return fig
  for i, cell in enumerate(cells):
    ax = fig.add_subplot(rows, cols, i + 1)
    names = list(loads[cell])
    load = np.array([loads[cell][k] for k in names])  # [layers, E]
    im = ax.imshow(load * load.shape[1], aspect="auto", cmap="viridis",
                   vmin=0, vmax=max(2.0, float(np.max(load * load.shape[1]))))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(cell, fontsize=9)
    fig.colorbar(im, ax=ax, label="E x load")
  fig.suptitle("Expert load per layer at the last eval (1 = balanced)")
  return fig


def save_all(directory: str, rows: list[dict], curve_rows: list[dict],
             loads: dict, x_key: str = "") -> list[str]:
  """Writes the figures as PNGs into directory; returns their paths."""
  figures = {"loss_curves.png": loss_curves(rows, curve_rows),
             "expert_load.png": expert_load(loads)}
  if x_key:
    figures[f"final_vs_{x_key.split('.')[-1]}.png"] = versus_axis(rows, x_key)
  paths = []
  for name, fig in figures.items():
    path = os.path.join(directory, name)
    fig.savefig(path, dpi=90)
    paths.append(path)
  return paths
