"""Optimizers and learning-rate schedules from the config's `train` section.

Adafactor is the one T5 and Switch trained with (Shazeer & Stern 2018; T5X's
`adafactor.Adafactor` defaults): factored second moments, decay rate
1 - t^-0.8, no first moment, update clipping at RMS 1.0, step size scaled by
the parameter's RMS (at least 1e-3), epsilon 1e-30.

Expert weights (`f32[E, M, H]`, `f32[E, H, M]`) are E independent matrices:
each expert gets its own factored statistics `[E, M]` and `[E, H]`, its own
update clipping and its own parameter scale, exactly as if Adafactor ran on
every `[M, H]` slice alone (T5X marks the expert axis FactorDim.BATCH). Plain
`optax.adafactor` would instead factor the two largest axes, which are E and
H once E >= M, and clip and scale across all experts together.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from switchjax import freeze

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "constant", "cosine")

# Adafactor constants of T5 / T5X.
MIN_DIM_SIZE_TO_FACTOR = 128
EPSILON1 = 1e-30  # added to squared gradients
CLIPPING_THRESHOLD = 1.0  # update clipping: RMS of an update block <= 1


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def logical_names(x: Any) -> Optional[tuple[Optional[str], ...]]:
  """The logical axis names an nnx Variable carries (`out_sharding`), or None."""
  if not isinstance(x, nnx.Variable):
    return None
  names = x.get_metadata().get("out_sharding")
  return tuple(names) if names is not None else None


def is_expert_param(path: Sequence[Any], shape: Sequence[int],
                    names: Optional[Sequence[Optional[str]]] = None) -> bool:
  """Whether a leaf holds stacked per-expert weights with a leading expert axis.

  True for leaves of rank >= 3 whose logical axis `names` (the Variable's
  metadata, e.g. `('expert', 'embed', 'expert_mlp')`) put 'expert' on a
  leading axis. The router's `[M, E]` kernel is `('embed', 'unmodeled')`: an
  ordinary matrix. Leaves without names (plain arrays) fall back to their
  path: a key containing 'expert' (the model keeps the expert weights under
  `.../mlp/experts/{wi,wi_0,wi_1,wo}`).
  """
  if len(shape) < 3:
    return False
  if names is not None:
    return "expert" in tuple(names)[:-2]
  return "expert" in jax.tree_util.keystr(
      tuple(path), simple=True, separator="/").lower()


def _matrix_view(path: Sequence[Any], shape: Sequence[int],
                 names: Optional[Sequence[Optional[str]]] = None
                 ) -> tuple[int, tuple[int, ...]]:
  """(number of leading batch axes, shape Adafactor factors) for one leaf.

  Expert leaves (`is_expert_param`; `names` are the leaf's logical axis
  names, if it has any): every axis but the last two is a batch axis. Other
  leaves of rank > 2 (attention `[M, N, D]`, `[N, D, M]`) are factored as a
  matrix of their largest axis against the product of the others when that
  axis comes first or last (T5X factors 'embed' against 'heads' x 'kv');
  otherwise, and for rank <= 2, as they are.
  """
  shape = tuple(shape)
  if is_expert_param(path, shape, names):
    return len(shape) - 2, shape[-2:]
  if len(shape) > 2:
    largest = max(range(len(shape)), key=lambda i: shape[i])
    if largest == 0:
      return 0, (shape[0], math.prod(shape[1:]))
    if largest == len(shape) - 1:
      return 0, (math.prod(shape[:-1]), shape[-1])
  return 0, shape


def _vmap_n(fn: Callable, n: int) -> Callable:
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


class PerMatrixState(NamedTuple):
  """One inner optimizer state per parameter leaf, in tree-flattening order."""
  leaves: tuple[Any, ...]


def per_matrix(inner: optax.GradientTransformation
               ) -> optax.GradientTransformation:
  """Applies `inner` to each parameter leaf as a batch of matrices.

  Each leaf is reshaped to its `_matrix_view` `[*batch, rows, cols]` and
  `inner` runs independently on every `[rows, cols]` matrix (vmapped over the
  batch axes), so block-wise statistics (factored moments, update RMS,
  parameter RMS) never mix experts. The state is kept per leaf, without the
  params' wrappers (e.g. nnx Variables), as plain arrays.
  """

  def views(tree):
    # Each array with the view of its leaf; nnx Variables carry the names.
    leaf_views = []
    for path, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=_is_variable)[0]:
      if not jax.tree.leaves(x):  # a frozen param (optax.MaskedNode)
        continue
      view = _matrix_view(path, x.shape, logical_names(x))
      leaf_views += [view] * len(jax.tree.leaves(x))
    flat, treedef = jax.tree_util.tree_flatten(tree)
    return list(zip(leaf_views, flat)), treedef

  def init_fn(params):
    leaves, _ = views(params)
    states = []
    for (n, shape), p in leaves:
      p = p.reshape(p.shape[:n] + shape)
      states.append(_vmap_n(inner.init, n)(p))
    return PerMatrixState(tuple(states))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("per_matrix Adafactor needs params (parameter scale).")
    leaves, treedef = views(updates)
    param_leaves = treedef.flatten_up_to(params)
    if len(state.leaves) != len(leaves):
      raise ValueError(
          f"optimizer state holds {len(state.leaves)} leaves, updates have "
          f"{len(leaves)}: was it initialised for other params?")
    new_updates, new_states = [], []
    for ((n, shape), u), p, s in zip(leaves, param_leaves, state.leaves):
      view = u.shape[:n] + shape
      step = _vmap_n(inner.update, n)
      u2, s2 = step(u.reshape(view), s, p.reshape(view))
      new_updates.append(u2.reshape(u.shape))
      new_states.append(s2)
    return treedef.unflatten(new_updates), PerMatrixState(tuple(new_states))

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adafactor(decay_rate: float = 0.8,
                       min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
                       clipping_threshold: float = CLIPPING_THRESHOLD
                       ) -> optax.GradientTransformation:
  """Adafactor's direction per matrix, before the learning rate and sign.

  For a matrix G with factored statistics R (rows) and C (cols):
  y = G / sqrt(R C / mean(R)); y /= max(1, rms(y) / clipping_threshold);
  y *= max(1e-3, rms(param)). Vectors and small matrices keep a full V.
  """
  return per_matrix(optax.chain(
      optax.scale_by_factored_rms(
          decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
          epsilon=EPSILON1),
      optax.clip_by_block_rms(clipping_threshold),
      optax.scale_by_param_block_rms()))


def _decay_mask(params):
  """Weight decay on matrices only: no decay of norm scales (rank 1)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """step -> learning rate, from train.{schedule, learning_rate, warmup_steps, num_steps}.

  - 'rsqrt' (T5): lr * sqrt(warmup / max(step, warmup)), i.e. the peak for the
    first `warmup_steps` steps, then 1/sqrt(step) decay (T5: 0.01 for 10k steps).
  - 'constant': linear warm-up from 0 over `warmup_steps` (none if 0), then lr.
  - 'cosine': linear warm-up from 0, then cosine decay to 0 at `num_steps`.

  The values are validate.prepare's to check (rsqrt needs warmup_steps >= 1,
  cosine num_steps > warmup_steps).
  """
  t = config.train
  lr, warmup = float(t.learning_rate), int(t.warmup_steps)
  assert t.schedule in SCHEDULES, t.schedule
  if t.schedule == "rsqrt":
    def rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      return lr * jnp.sqrt(warmup / jnp.maximum(step, float(warmup)))
    return rsqrt
  if t.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
        [warmup])
  return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=int(t.num_steps), end_value=0.0)


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """The optimizer that train.optimizer names, with the config's schedule.

  train.grad_clip > 0 clips the gradients' global norm first. Weight decay is
  decoupled and multiplied by the learning rate (AdamW's convention, for both
  optimizers), on parameters of rank >= 2 only. Adafactor's optional momentum
  (train.adafactor_momentum) averages the updates before the learning rate is
  applied (T5X averages them after; the same under a constant rate). The
  values are validate.prepare's to check.
  """
  t = config.train
  assert t.optimizer in OPTIMIZERS, t.optimizer
  schedule = learning_rate_schedule(config)

  chain = []
  if t.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(t.grad_clip))
  if t.optimizer == "adafactor":
    chain.append(scale_by_adafactor(decay_rate=t.adafactor_decay_rate))
    if t.adafactor_momentum > 0:
      # T5X's beta1: an undebiased average of the updates.
      chain.append(optax.ema(t.adafactor_momentum, debias=False))
  else:
    chain.append(optax.scale_by_adam(b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps))
  if t.weight_decay > 0:
    chain.append(optax.add_decayed_weights(t.weight_decay, mask=_decay_mask))
  chain.append(optax.scale_by_learning_rate(schedule))
  return freeze.wrap(optax.chain(*chain), t.freeze)
