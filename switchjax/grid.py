"""Ablation grids: which configs a sweep trains, as plain data.

A grid config (experiments/ablations/*.py) is an ml_collections.ConfigDict:

  name            str, e.g. "capacity_factor"
  description     str, what the paper did and what this grid varies
  experiment      the base experiment file, e.g. "experiments/switch_base.py"
  preset          its preset ("full" or "tiny")
  overrides       nested ConfigDict applied to every cell, e.g.
                  {"train": {"num_steps": 300}}; on the command line
                  --config.overrides.train.num_steps=100
  axes            tuple of axes; the cells are their product
  cells           one more axis of extra named cells (a dense baseline)
  x_axis          dotted config key for the "final loss vs axis" plot ("" = none)
  loss_threshold  train loss whose first crossing the results table reports

An axis is a tuple of `(label, overrides)` pairs, one per value, where
overrides maps dotted config keys to values. Build them with `axis`,
`zipped` and `variants`. A product cell is named by joining its labels with
"_" and gets the union of their overrides (later axes win).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import shlex
from typing import Any, Mapping, Sequence

import ml_collections

from switchjax.validate import flatten  # dotted keys, shared with config checks

Overrides = dict[str, Any]
Axis = tuple[tuple[str, Overrides], ...]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


def axis(key: str, values: Sequence[Any], label: str | None = None) -> Axis:
  """One config key over values; labels are f"{label}{value}".

  label defaults to the key's last part and "=", e.g. "num_experts=8".
  """
  if not values:
    raise ValueError(f"axis {key!r} has no values")
  prefix = f"{key.split('.')[-1]}=" if label is None else label
  return tuple((f"{prefix}{v}", {key: v}) for v in values)


def zipped(keys: Sequence[str], rows: Sequence[Sequence[Any]],
           labels: Sequence[str]) -> Axis:
  """Several keys that move together, one label per row.

  zipped(("moe.router", "moe.num_selected"), [("switch", 1), ("topk", 2)],
         labels=("top1", "top2"))
  """
  if len(rows) != len(labels):
    raise ValueError(f"zipped axis {keys}: {len(rows)} rows but "
                     f"{len(labels)} labels")
  out = []
  for label, row in zip(labels, rows):
    if len(row) != len(keys):
      raise ValueError(f"zipped axis {keys}: row {label!r} has {len(row)} "
                       f"values, expected {len(keys)}")
    out.append((label, dict(zip(keys, row))))
  return tuple(out)


def variants(**named: Mapping[str, Any]) -> Axis:
  """Named cells, each with its own overrides: variants(dense={...}, ...)."""
  return tuple((name, dict(overrides)) for name, overrides in named.items())


def base_grid(name: str, experiment: str, preset: str | None) -> ml_collections.ConfigDict:
  """A grid with no axes yet; grid files fill in axes, cells and the rest."""
  g = ml_collections.ConfigDict()
  g.name = name
  g.description = ""
  g.experiment = experiment
  g.preset = preset or "full"
  g.overrides = ml_collections.ConfigDict()
  g.axes = ()
  g.cells = ()
  g.x_axis = ""
  g.loss_threshold = 0.0
  return g


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of a grid.

  name: its workdir's name under the sweep's DIR.
  overrides: dotted key -> value, the cell's own (not the grid's common ones).
  labels: its label on each axis (empty for an extra cell).
  """
  name: str
  overrides: dict[str, Any]
  labels: tuple[str, ...] = ()

  @property
  def is_extra(self) -> bool:
    return not self.labels


def _check_axis(where: str, ax: Any) -> Axis:
  try:
    pairs = tuple((str(label), dict(overrides)) for label, overrides in ax)
  except (TypeError, ValueError):
    raise ValueError(
        f"{where} must be a tuple of (label, {{key: value}}) pairs (use "
        "grid.axis / grid.zipped / grid.variants)") from None
  if not pairs:
    raise ValueError(f"{where} is empty")
  return pairs


def expand(grid: ml_collections.ConfigDict) -> list[Cell]:
  """The grid's cells: the product of its axes, then its extra cells."""
  axes = [_check_axis(f"grid {grid.name!r} axis {i}", ax)
          for i, ax in enumerate(grid.axes)]
  cells = []
  if axes:
    for combo in itertools.product(*axes):
      overrides = {}
      for _, o in combo:
        overrides.update(o)
      labels = tuple(label for label, _ in combo)
      cells.append(Cell("_".join(labels), overrides, labels))
  if grid.cells:
    for name, overrides in _check_axis(f"grid {grid.name!r} cells", grid.cells):
      cells.append(Cell(name, overrides))
  if not cells:
    raise ValueError(f"grid {grid.name!r} has no cells (no axes, no cells)")
  seen = set()
  for cell in cells:
    if not _NAME.match(cell.name):
      raise ValueError(
          f"grid {grid.name!r}: cell name {cell.name!r} is not a plain "
          "directory name (letters, digits, _ . = + -)")
    if cell.name in seen:
      raise ValueError(f"grid {grid.name!r}: two cells are named {cell.name!r}")
    seen.add(cell.name)
  return cells


def resolve_path(path: str) -> str:
  """An experiment path as given, else relative to the repository root."""
  if os.path.exists(path):
    return path
  candidate = os.path.join(ROOT, path)
  if os.path.exists(candidate):
    return candidate
  raise ValueError(f"experiment file {path!r} not found (looked in the "
                   f"current directory and in {ROOT})")


def _get_config(path: str, arg: str | None) -> Any:
  """get_config(arg) of a config file, loaded as config_flags loads it."""
  resolved = resolve_path(path)
  spec = importlib.util.spec_from_file_location(
      "switchjax_config_" + re.sub(r"\W", "_", resolved), resolved)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config()")
  return module.get_config(arg)


def load_experiment(path: str, preset: str | None) -> ml_collections.ConfigDict:
  """experiments/<model>.py's get_config(preset)."""
  return _get_config(path, preset)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any],
                    where: str) -> ml_collections.ConfigDict:
  """A copy of config with dotted keys set; unknown keys raise ValueError."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(f"{where}: unknown config key {key!r}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ValueError(f"{where}: unknown config key {key!r} (a section; name "
                       "a key inside it)")
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"{where}: bad value {value!r} for {key!r}: {e}") from None
  return config


def common_overrides(grid: ml_collections.ConfigDict) -> dict[str, Any]:
  return flatten(grid.overrides)


def cell_configs(grid: ml_collections.ConfigDict
                 ) -> list[tuple[Cell, ml_collections.ConfigDict]]:
  """Every cell with its full experiment config (not yet validated)."""
  cells = expand(grid)
  base = load_experiment(grid.experiment, grid.preset)
  base = apply_overrides(base, common_overrides(grid),
                         f"grid {grid.name!r} overrides")
  return [(cell, apply_overrides(base, cell.overrides,
                                 f"grid {grid.name!r} cell {cell.name!r}"))
          for cell in cells]


def check_x_axis(grid: ml_collections.ConfigDict,
                 config: ml_collections.ConfigDict) -> None:
  if grid.x_axis and grid.x_axis not in flatten(config):
    raise ValueError(f"grid {grid.name!r}: x_axis {grid.x_axis!r} is not a "
                     "config key")


def _flag_value(value: Any) -> str:
  """How config_flags parses a value back from the command line."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  return repr(value)


def command(grid: ml_collections.ConfigDict, cell: Cell, workdir: str) -> str:
  """The `python -m switchjax.main` command line that trains `cell`."""
  overrides = {**common_overrides(grid), **cell.overrides}
  args = ["python", "-m", "switchjax.main",
          f"--config={grid.experiment}:{grid.preset}",
          f"--workdir={os.path.join(workdir, cell.name)}"]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
  return " ".join(shlex.quote(a) for a in args)


def load_grid(spec: str) -> ml_collections.ConfigDict:
  """A grid file's config from "path[:preset]", as --config reads it."""
  path, _, preset = spec.partition(":")
  return _get_config(path, preset or None)
