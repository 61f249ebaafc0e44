"""A run's params as {path: array}: read from a workdir, placed on a mesh.

A path is the tuple of keys of `nnx.state(model, nnx.Param)`, e.g.
('encoder', 'layers', 1, 'mlp', 'experts', 'wi'). The converters, the
scorer and `train.init_from` exchange params in this form.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from switchjax import checkpoint as ckpt_lib
from switchjax import config_base


class WeightsError(ValueError):
  """A workdir whose weights cannot be read (one line)."""


def param_path(keypath) -> tuple:
  """jax key path of a State leaf -> its param path (drops `.value`)."""
  return tuple(k.key for k in keypath
               if isinstance(k, jax.tree_util.DictKey))


def flat_params(params: Any) -> dict[tuple, np.ndarray]:
  """An nnx.State of params (arrays or ShapeDtypeStructs) -> {path: leaf}."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {param_path(kp): leaf for kp, leaf in leaves}


def shapes(params: Any) -> dict[tuple, tuple[int, ...]]:
  return {p: tuple(a.shape) for p, a in flat_params(params).items()}


def place(abstract_params: Any, flat: dict[tuple, Any]) -> Any:
  """The State of `abstract_params` (ShapeDtypeStructs with shardings)
  holding the arrays of `flat`, each put where its sharding says."""
  def put(kp, a):
    return jax.device_put(np.asarray(flat[param_path(kp)], a.dtype), a.sharding)
  return jax.tree_util.tree_map_with_path(put, abstract_params)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise WeightsError(f"{workdir} holds no config.json (not a switchjax run)")
  with open(path) as f:
    return config_base.with_defaults(json.load(f))


def restore(workdir: str, abstract_state: Any,
            step: Optional[int] = None) -> tuple[int, Any]:
  """(step, train state) of `workdir`'s checkpoint `step` (default: newest),
  without the data position."""
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=10**6, log=None)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise WeightsError(f"{workdir} holds no checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise WeightsError(f"step {step} is not in {workdir} (steps "
                         f"{', '.join(map(str, sorted(steps)))})")
    return step, checkpointer.restore(step, abstract_state, None)
  finally:
    checkpointer.close()
