"""The experts one at a time (CPU), with a backward pass that writes each weight gradient once.

`Experts` with impl 'loop' runs each expert's FFN as plain 2-D matmuls in a
`lax.map`; on CPU that is at least as fast as one batched matmul over E, and
faster with many small experts (README, Speed). Left to autodiff, the
backward pass is a second scan whose per-expert weight gradients are stacked
into zero-filled [E, M, H] buffers: a memset of every expert's weights per
step, as costly as a copy of them. Here the backward loop computes only the
input gradients; the weight gradients are batched einsums over E that write
each gradient once (`EGCM` flattened to `ERM`, R = G * C rows per expert).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from switchjax import ffn as ffn_lib


def _hidden(pre: tuple[jax.Array, ...], mask: Optional[jax.Array],
            activation: str) -> jax.Array:
  """Pre-activations (x @ wi_0[, x @ wi_1]) -> hidden activations, masked."""
  h = ffn_lib.activate(pre, activation)
  return h if mask is None else h * mask


def _forward(x, wi, wo, mask, activation, dtype):
  """y[E, R, M] and the pre-activations ([E, R, H], ...), expert by expert."""

  def one_expert(args):
    xe, wie, woe, mask_e = args  # [R, M], ([M, H], ...), [H, M], [R, H]|None
    # Weights stay float32 in memory and are cast one expert at a time.
    pre = tuple(xe @ w.astype(dtype) for w in wie)
    return _hidden(pre, mask_e, activation) @ woe.astype(dtype), pre

  return jax.lax.map(one_expert, (x, wi, wo, mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def ffn(x: jax.Array, wi: tuple[jax.Array, ...], wo: jax.Array,
        mask: Optional[jax.Array], activation: str, dtype: Any) -> jax.Array:
  """x[E, R, M] in `dtype` -> [E, R, M]; wi: (f32[E, M, H], ...), wo: f32[E, H, M].

  `mask`: expert-dropout multiplier [E, R, H] (0 or 1/keep) or None.
  """
  return _forward(x, wi, wo, mask, activation, dtype)[0]


def _ffn_fwd(x, wi, wo, mask, activation, dtype):
  y, pre = _forward(x, wi, wo, mask, activation, dtype)
  return y, (x, wi, wo, mask, pre)


def _ffn_bwd(activation, dtype, residuals, dy):
  x, wi, wo, mask, pre = residuals
  dy = dy.astype(dtype)

  def one_expert(args):
    dye, wie, woe, pre_e, mask_e = args
    h, hidden_vjp = jax.vjp(lambda *p: _hidden(p, mask_e, activation), *pre_e)
    dpre = hidden_vjp(dye @ woe.astype(dtype).T)
    dx = sum(d @ w.astype(dtype).T for d, w in zip(dpre, wie))
    return dx.astype(dtype), h, dpre

  dx, h, dpre = jax.lax.map(one_expert, (dy, wi, wo, pre, mask))
  # In `dtype`, then cast to the params' float32, as autodiff of the cast.
  dwo = jnp.einsum("ERH,ERM->EHM", h, dy)
  dwi = tuple(jnp.einsum("ERM,ERH->EMH", x, d) for d in dpre)
  dmask = None if mask is None else jnp.zeros_like(mask)
  return (dx, tuple(d.astype(w.dtype) for d, w in zip(dwi, wi)),
          dwo.astype(wo.dtype), dmask)


ffn.defvjp(_ffn_fwd, _ffn_bwd)
