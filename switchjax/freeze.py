"""Which parameters a run does not train (`train.freeze`).

The fine-tuning recipes of the MoE literature: train only the experts
(freeze `non_experts`) or freeze the MoE layers and train the rest (`moe`,
ST-MoE §5: nearly as good, cheaper). `train.freeze` is one of

  experts      every expert weight (.../mlp/experts/..., and DeepSeekMoE's
               .../mlp/shared_experts/...)
  router       every router kernel (.../mlp/router/...)
  moe          experts and routers
  non_experts  everything but experts and routers
  or a regular expression, searched in each parameter's path
  ('decoder/layers/1/mlp/experts/wi_0', 'embedding', ...)

Frozen parameters get `optax.set_to_zero()` through `optax.multi_transform`:
no optimizer state, a zero update, so they stay bit-identical to where the
run started (`train.init_from`); they are left out of the gradient norm, its
clipping and the weight decay, and XLA drops their unused weight gradients.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import optax

MOE = r"/mlp/(experts|shared_experts|router)/"
RECIPES = {
    "experts": r"/mlp/(shared_)?experts/",
    "router": r"/mlp/router/",
    "moe": MOE,
}
NON_EXPERTS = "non_experts"  # the complement of MOE
TRAIN, FROZEN = "train", "frozen"


class FreezeError(ValueError):
  """A train.freeze value that selects nothing, everything, or does not parse."""


def param_path(path: tuple) -> str:
  """'decoder/layers/1/mlp/experts/wi_0' of a params-state leaf path, with
  or without the Variable's own `.value` attribute key at the end."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
    path = path[:-1]
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def is_frozen(path: str, freeze: str) -> bool:
  """Whether the parameter at `path` is frozen under `freeze` ('' = none)."""
  if not freeze:
    return False
  if freeze == NON_EXPERTS:
    return not re.search(MOE, f"/{path}/")
  if freeze in RECIPES:
    return bool(re.search(RECIPES[freeze], f"/{path}/"))
  return bool(re.search(freeze, path))


def labels(params: Any, freeze: str) -> Any:
  """params -> the same tree of 'train' / 'frozen'."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: FROZEN if is_frozen(param_path(p), freeze) else TRAIN,
      params)


def trainable(tree: Any, freeze: str) -> list:
  """The leaves of a params-shaped tree (e.g. gradients) that train."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [x for p, x in leaves if not is_frozen(param_path(p), freeze)]


def wrap(tx: optax.GradientTransformation,
         freeze: str) -> optax.GradientTransformation:
  """`tx` on the parameters that train, nothing (no state) on the rest."""
  if not freeze:
    return tx
  return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()},
                               lambda params: labels(params, freeze))


def check(params: Any, freeze: str) -> tuple[int, int]:
  """(parameters that train, all parameters) of an abstract params tree, or
  FreezeError if `freeze` selects none of them or all of them."""
  if not freeze:
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return n, n
  if freeze not in RECIPES and freeze != NON_EXPERTS:
    try:
      re.compile(freeze)
    except re.error as e:
      raise FreezeError(f"train.freeze={freeze!r} is not one of "
                        f"{', '.join([*RECIPES, NON_EXPERTS])} nor a regular "
                        f"expression ({e})") from None
  sizes = {param_path(p): math.prod(x.shape)
           for p, x in jax.tree_util.tree_leaves_with_path(params)}
  frozen = [p for p in sizes if is_frozen(p, freeze)]
  if not frozen:
    raise FreezeError(f"train.freeze={freeze!r} matches no parameter of this "
                      f"model (paths look like {next(iter(sizes))!r})")
  if len(frozen) == len(sizes):
    raise FreezeError(f"train.freeze={freeze!r} freezes every parameter: "
                      "nothing would train")
  total = sum(sizes.values())
  return total - sum(sizes[p] for p in frozen), total
