"""The experts one at a time (CPU), with a backward pass that writes each weight gradient once.

`Experts` with impl 'loop' runs each expert's FFN as plain 2-D matmuls in a
`lax.map`; on CPU that is as fast as one batched matmul over E at E=8 and
faster with many small experts (E=128: 0.69x the time, forward+backward,
benchmarks/moe_breakdown.py). Left to autodiff, the backward pass is a
second scan whose per-expert weight gradients are stacked into zero-filled
[E, M, H] buffers: a memset of every expert's weights per step, as costly
as a copy of them (E=128: a quarter of the experts' time). Here the backward
loop computes only the input gradients; the weight gradients are batched
einsums over E that write each gradient once (`EGCM` flattened to `ETM`,
T = G * C).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp


def _hidden(pre: tuple[jax.Array, ...], mask: Optional[jax.Array],
            activation: str) -> jax.Array:
  """Pre-activations (x @ wi_0[, x @ wi_1]) -> hidden activations."""
  if activation == "gated_gelu":
    h = jax.nn.gelu(pre[0], approximate=True) * pre[1]
  else:
    h = jax.nn.relu(pre[0])
  return h if mask is None else h * mask


def _forward(x, wi, wo, mask, activation, dtype):
  """y[E, T, M] and the pre-activations ([E, T, H], ...), expert by expert."""

  def one_expert(args):
    xe, wie, woe, mask_e = args  # [T, M], ([M, H], ...), [H, M], [T, H]|None
    # Weights stay float32 in memory and are cast one expert at a time.
    pre = tuple(xe @ w.astype(dtype) for w in wie)
    return _hidden(pre, mask_e, activation) @ woe.astype(dtype), pre

  return jax.lax.map(one_expert, (x, wi, wo, mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def ffn(x: jax.Array, wi: tuple[jax.Array, ...], wo: jax.Array,
        mask: Optional[jax.Array], activation: str, dtype: Any) -> jax.Array:
  """x[E, T, M] in `dtype` -> [E, T, M]; wi: (f32[E, M, H], ...), wo: f32[E, H, M].

  `mask`: expert-dropout multiplier [E, T, H] (0 or 1/keep) or None.
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
  dwo = jnp.einsum("ETH,ETM->EHM", h, dy)
  dwi = tuple(jnp.einsum("ETM,ETH->EMH", x, d) for d in dpre)
  dmask = None if mask is None else jnp.zeros_like(mask)
  return (dx, tuple(d.astype(w.dtype) for d, w in zip(dwi, wi)),
          dwo.astype(wo.dtype), dmask)


ffn.defvjp(_ffn_fwd, _ffn_bwd)
