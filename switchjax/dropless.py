"""Dropless expert computation: no capacity, grouped matmuls (`moe.dispatch='dropless'`).

Notation: see `switchjax/__init__.py`; here R = G * S * K, the token choices
(one row each).

With a capacity, a token whose expert is full is dropped (it passes through
the residual only). Dropless MoE (MegaBlocks, Gale et al. 2022) keeps every
choice: the R (token, choice) pairs are sorted by expert, each expert's
contiguous block of rows goes through that expert's FFN in one grouped matmul
(`jax.lax.ragged_dot`: rows of block e times expert e's weights), and the
outputs are unsorted and summed per token with the combine weights. The
FLOPs are exactly the active ones (R rows), whatever the load balance.

Only token-choice routers have a dropless form (expert choice picks a fixed
number of tokens per expert by design). The layer routes with capacity S, so
no choice is ever dropped for lack of room; a choice the router itself
discards (GShard's random second-expert policy) is sorted past the last block,
computes nothing and has weight 0.

Cost: on GPU/TPU `ragged_dot` lowers to grouped-GEMM kernels. On CPU, XLA
has no grouped kernel and computes every row against every expert's weights
(E times the active FLOPs, temporaries of O(E * R * H)): many times the
capacity path's time (README, Speed). Use it on CPU only for tests and small
models.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from switchjax import ffn as ffn_lib
from switchjax import routing as routing_lib


def sort_by_expert(expert_index: jax.Array, valid: jax.Array,
                   num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Order of the R flat choices grouped by expert, and the size of each group.

  Args:
    expert_index: i32[R] expert of each choice.
    valid: bool[R] whether the choice is made; invalid ones sort last.
    num_experts: E.

  Returns:
    (order i32[R], group_sizes i32[E]): choice order[i] is row i of the sorted
    rows; rows [sum(sizes[:e]), sum(sizes[:e+1])) belong to expert e. A stable
    sort keeps token order within each expert.
  """
  ids = jnp.where(valid, expert_index, num_experts)
  order = jnp.argsort(ids, stable=True)
  sizes = jnp.bincount(ids, length=num_experts + 1)[:num_experts]
  return order.astype(jnp.int32), sizes.astype(jnp.int32)


def expert_ffn(x: jax.Array, group_sizes: jax.Array, wi: tuple[jax.Array, ...],
               wo: jax.Array, activation: str,
               dropout_mask: Optional[jax.Array] = None) -> jax.Array:
  """Grouped FFN on expert-sorted rows.

  Args:
    x: [R, M] rows sorted by expert.
    group_sizes: i32[E] rows per expert (rows past their sum give zeros).
    wi: ([E, M, H],) or, for a gated activation, ([E, M, H], [E, M, H]).
    wo: [E, H, M].
    activation: one of ffn.ACTIVATIONS.
    dropout_mask: [R, H] or None, multiplies the hidden activations.

  Returns:
    [R, M], row r = FFN of its expert applied to x[r].
  """
  h = ffn_lib.activate(
      tuple(jax.lax.ragged_dot(x, w, group_sizes) for w in wi), activation)
  if dropout_mask is not None:
    h = h * dropout_mask
  return jax.lax.ragged_dot(h, wo, group_sizes)


def apply(x: jax.Array, routing: routing_lib.Routing, experts: Any,
          deterministic: Optional[bool] = None) -> jax.Array:
  """Tokens x[G, S, M] -> combined expert outputs [G, S, M], no token dropped.

  Args:
    x: [G, S, M] in the experts' dtype.
    routing: a token-choice Routing (with expert_index, slot_index,
      token_weight); a choice counts as made iff its slot_index < E * C.
    experts: an `experts.Experts` (its weights(), activation, dtype and
      dropout_mask()).
    deterministic: turns expert dropout off (None: the module's own flag).
  """
  if routing.expert_index is None:
    raise ValueError(
        "dispatch 'dropless' needs a token-choice router (switch, gshard, "
        "topk, noisy_topk); expert_choice has no per-token choices.")
  g, s, m = x.shape
  k = routing.expert_index.shape[-1]
  num_experts, capacity = routing.num_experts, routing.capacity
  valid = routing.slot_index < num_experts * capacity  # [G, S, K]
  order, sizes = sort_by_expert(routing.expert_index.reshape(-1),
                                valid.reshape(-1), num_experts)
  rows = x.reshape(g * s, m)[order // k]  # [R, M], choice r is token r // K
  wi, wo = experts.weights()
  wi = tuple(w.astype(experts.dtype) for w in wi)
  wo = wo.astype(experts.dtype)
  mask = experts.dropout_mask((rows.shape[0], wo.shape[1]), deterministic)
  out = expert_ffn(rows, sizes, wi, wo, experts.activation, mask)
  # Unsort with the inverse permutation: a gather, not a scatter.
  inverse = jnp.argsort(order)
  out = out[inverse].reshape(g, s, k, m)
  return jnp.einsum("GSKM,GSK->GSM", out,
                    routing.token_weight.astype(out.dtype))
