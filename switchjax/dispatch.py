"""Dispatch and combine: tokens in groups <-> per-expert buffers.

Notation: see `switchjax/__init__.py`. Tokens `[B, L, M]` are cut into
groups `[G, S, M]` (`group_tokens`); a `routing.Routing` says which token
sits in which slot; dispatch fills the expert buffers `[E, G, C, M]` and
combine sums the expert outputs back into token order, weighted. A token
that reaches no expert comes back as a zero row (the model's residual
connection carries it). Two mechanisms compute the same function:

- "einsum": GShard / flaxformer's one-hot `[G, S, E, C]` dispatch and
  combine tensors contracted with einsums ('GSEC,GSM->EGCM',
  'GSEC,EGCM->GSM'). Memory and FLOPs grow with S * E * C.
- "gather" (default; "fast" is its old name): gathers tokens by
  `Routing.token_index` and gathers the expert outputs back by
  `Routing.slot_index` (token-choice routers) or scatter-adds them by
  `token_index` (expert choice). Never builds `[G, S, E, C]`.

"dropless" (`switchjax.dropless`) has no buffers at all: grouped matmuls
over expert-sorted rows. Relative costs: README, Speed.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from switchjax import routing as routing_lib

DISPATCHES = ("gather", "einsum", "dropless")
# Old names still accepted in configs and workdirs.
ALIASES = {"fast": "gather"}

DispatchFn = Callable[[jax.Array, routing_lib.Routing], jax.Array]


def canonical(dispatch: str) -> str:
  """The DISPATCHES name of `dispatch` (an alias maps to its new name)."""
  return ALIASES.get(dispatch, dispatch)


def group_tokens(x: jax.Array, group_size: int) -> jax.Array:
  """x[B, L, M] -> [G, S, M] with S = min(group_size, B * L)."""
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}.")
  b, l, m = x.shape
  num_tokens = b * l
  s = min(group_size, num_tokens)
  if num_tokens % s:
    raise ValueError(
        f"group_size={group_size} does not divide the number of tokens "
        f"B*L={b}*{l}={num_tokens}; choose a group_size that divides B*L.")
  return x.reshape(num_tokens // s, s, m)


def dispatch_einsum(x: jax.Array, routing: routing_lib.Routing) -> jax.Array:
  """x[G, S, M] -> expert buffers [E, G, C, M] via the one-hot dispatch mask."""
  mask = routing.dispatch_mask().astype(x.dtype)
  return jnp.einsum("GSEC,GSM->EGCM", mask, x)


def combine_einsum(y: jax.Array, routing: routing_lib.Routing) -> jax.Array:
  """Expert outputs y[E, G, C, M] -> tokens [G, S, M] via the combine tensor."""
  weights = routing.combine_weights().astype(y.dtype)
  return jnp.einsum("GSEC,EGCM->GSM", weights, y)


def dispatch_gather(x: jax.Array, routing: routing_lib.Routing) -> jax.Array:
  """x[G, S, M] -> expert buffers [E, G, C, M], gathering by token_index.

  An empty slot holds the index S, one past the end; mode='fill' reads it as a
  zero row (the same as padding x with a zero row, without copying x), and the
  gradient's scatter drops it.
  """
  num_groups = x.shape[0]
  token_index = jnp.transpose(routing.token_index, (1, 0, 2))  # [E, G, C]
  group_index = jnp.arange(num_groups)[None, :, None]
  return x.at[group_index, token_index].get(mode="fill", fill_value=0)


def combine_gather(y: jax.Array, routing: routing_lib.Routing) -> jax.Array:
  """Expert outputs y[E, G, C, M] -> tokens [G, S, M] for token-choice routings.

  Each token gathers its K expert outputs at slot_index = e * C + c and sums them
  weighted by token_weight. A dropped choice has slot_index E * C: its expert
  index e = E is out of range and mode='fill' reads a zero row, the same as a
  zero row appended to the flat [G, E*C, M] outputs, without the copy.
  """
  capacity = y.shape[2]
  slot = routing.slot_index  # [G, S, K]
  group_index = jnp.arange(y.shape[1])[:, None, None]
  picked = y.at[slot // capacity, group_index, slot % capacity].get(
      mode="fill", fill_value=0)  # [G, S, K, M]
  return jnp.einsum("GSKM,GSK->GSM", picked, routing.token_weight.astype(y.dtype))


def combine_scatter(y: jax.Array, routing: routing_lib.Routing) -> jax.Array:
  """Expert outputs y[E, G, C, M] -> tokens [G, S, M] by scatter-add.

  Works for any routing (expert choice has no token-major view): slot (e, c)
  adds slot_weight times its output to token token_index[g, e, c]; empty slots
  (index S) fall out of range and mode='drop' ignores them.
  """
  _, num_groups, _, d_model = y.shape
  token_index = jnp.transpose(routing.token_index, (1, 0, 2))  # [E, G, C]
  weight = jnp.transpose(routing.slot_weight, (1, 0, 2)).astype(y.dtype)
  group_index = jnp.arange(num_groups)[None, :, None]
  out = jnp.zeros((num_groups, routing.num_tokens, d_model), y.dtype)
  return out.at[group_index, token_index].add(y * weight[..., None], mode="drop")


def combine_indexed(y: jax.Array, routing: routing_lib.Routing) -> jax.Array:
  """Gather when the routing has a token-major view, scatter-add otherwise."""
  if routing.slot_index is not None:
    return combine_gather(y, routing)
  return combine_scatter(y, routing)


def functions(dispatch: str) -> tuple[DispatchFn, DispatchFn]:
  """(dispatch, combine) of the buffered mechanism `dispatch` names."""
  dispatch = canonical(dispatch)
  if dispatch == "einsum":
    return dispatch_einsum, combine_einsum
  if dispatch == "gather":
    return dispatch_gather, combine_indexed
  raise ValueError(f"dispatch {dispatch!r} has no expert buffers; expected "
                   "'gather' or 'einsum'.")
