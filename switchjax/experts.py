"""The experts and the dense FFN: parameters and how their matmuls run (Flax NNX).

`Experts` holds E feed-forward networks as stacked weights and applies them
to dispatched buffers `[E, G, C, M]`; `MlpBlock` is the dense FFN it is
FLOP-matched to. Both compute `switchjax.ffn`'s function; notation: see
`switchjax/__init__.py`.
"""
from __future__ import annotations

from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from switchjax import expert_loop
from switchjax import ffn
from switchjax import partitioning

# How Experts runs its E matmuls: one batched einsum, a loop over experts
# (lax.map), or "auto" (the loop on CPU unless the experts are split over
# devices; batched elsewhere).
EXPERT_IMPLS = ("auto", "batched", "loop")
# The batched experts' einsums: [E, G, C, M] buffers through [E, M, H] weights.
BATCHED_SPECS = ("EGCM,EMH->EGCH", "EGCH,EHM->EGCM")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  """One wording of an unknown choice among a module's own arguments."""
  if value not in allowed:
    raise ValueError(f"Unknown {name} {value!r}; expected one of {allowed}.")


def _loop_by_default() -> bool:
  """Experts impl 'auto': loop over experts on CPU unless they are split over devices.

  On CPU one matmul per expert is at least as fast as XLA's batched matmul
  over E, and faster with many small experts (README, Speed); on GPU/TPU the
  batched einsum is the fast one. A loop over an axis that the mesh splits
  ('expert' > 1) would gather the weights: keep the einsum there.
  """
  if jax.default_backend() != "cpu":
    return False
  mesh = partitioning.current_mesh()
  return mesh is None or partitioning.axes_size(
      partitioning.axes_of("expert", mesh), mesh) == 1


class Experts(nnx.Module):
  """E feed-forward networks with stacked weights, applied to dispatched buffers.

  wi: f32[E, M, H] (wi_0 and wi_1 for a gated activation), wo: f32[E, H, M]. Computes
  in `dtype`; params stay float32. `dropout` is expert dropout on the hidden
  activations (Switch uses 0.4 when fine-tuning), training only. `impl`, one
  of EXPERT_IMPLS, picks how the same function is computed: one batched
  einsum, or a `lax.map` over experts (each expert plain 2-D matmuls).
  """

  def __init__(self, num_experts: int, d_model: int, d_ff: int, *,
               activation: str = "relu", dropout: float = 0.0,
               init_scale: float = 0.1, dtype: Any = jnp.float32,
               impl: str = "auto", deterministic: bool = False,
               rngs: nnx.Rngs):
    check_choice("activation", activation, ffn.ACTIVATIONS)
    check_choice("expert impl", impl, EXPERT_IMPLS)
    ffn.make_params(self, (num_experts, d_model, d_ff),
                    (num_experts, d_ff, d_model), activation, init_scale, rngs,
                    ("expert", "embed", "expert_mlp"),
                    ("expert", "expert_mlp", "embed"))
    self.activation = activation
    self.dtype = dtype
    self.impl = impl
    self.dropout = ffn.make_dropout(dropout, deterministic, rngs)

  def uses_loop(self) -> bool:
    """Whether calls run one expert at a time (impl 'loop', or 'auto' on CPU)."""
    return self.impl == "loop" or (self.impl == "auto" and _loop_by_default())

  def weights(self) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """(wi tuple, wo): the float32 stacked weights."""
    return ffn.weights(self, self.activation)

  def dropout_keep(self, shape: tuple[int, ...],
                   deterministic: Optional[bool] = None) -> Optional[jax.Array]:
    """Expert-dropout mask bool[shape] of the hidden activations; None when off."""
    return ffn.dropout_keep(self.dropout, shape, deterministic)

  def dropout_mask(self, shape: tuple[int, ...],
                   deterministic: Optional[bool] = None) -> Optional[jax.Array]:
    """The same draw as a multiplier (0 or 1/keep) in `dtype`; None when off."""
    keep = self.dropout_keep(shape, deterministic)
    if keep is None:
      return None
    return ffn.apply_dropout(jnp.ones(shape, self.dtype), keep, self.dropout.rate)

  def _loop(self, x: jax.Array, deterministic: Optional[bool]) -> jax.Array:
    """x[E, G, C, M] -> [E, G, C, M], one expert's 2-D matmuls at a time."""
    e, g, c, m = x.shape
    wi, wo = self.weights()
    mask = self.dropout_mask((e, g, c, wi[0].shape[2]), deterministic)
    if mask is not None:
      mask = mask.reshape(e, g * c, -1)
    y = expert_loop.ffn(x.reshape(e, g * c, m), wi, wo, mask,
                        self.activation, self.dtype)
    return y.reshape(e, g, c, m)

  def __call__(self, x: jax.Array, *, deterministic: Optional[bool] = None) -> jax.Array:
    """x[E, G, C, M] -> [E, G, C, M] in `dtype`."""
    x = x.astype(self.dtype)
    if self.uses_loop():
      return self._loop(x, deterministic)
    wi, wo = self.weights()
    keep = self.dropout_keep(x.shape[:-1] + (wo.shape[1],), deterministic)
    return ffn.apply(x, wi, wo, BATCHED_SPECS, self.activation, self.dtype,
                     keep, self.dropout.rate)


class MlpBlock(nnx.Module):
  """Dense feed-forward block, FLOP-matched to a K=1 MoE layer of equal H.

  wi: f32[M, H] (wi_0 and wi_1 for a gated activation), wo: f32[H, M]; same
  activations and init as `Experts`; `dropout` on the hidden activations.
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu",
               dropout: float = 0.0, init_scale: float = 0.1,
               dtype: Any = jnp.float32, deterministic: bool = False,
               rngs: nnx.Rngs):
    check_choice("activation", activation, ffn.ACTIVATIONS)
    ffn.make_params(self, (d_model, d_ff), (d_ff, d_model), activation,
                    init_scale, rngs, ("embed", "mlp"), ("mlp", "embed"))
    self.activation = activation
    self.dtype = dtype
    self.dropout = ffn.make_dropout(dropout, deterministic, rngs)

  def __call__(self, x: jax.Array, *, deterministic: Optional[bool] = None) -> jax.Array:
    """x[B, L, M] -> [B, L, M] in `dtype`."""
    wi, wo = ffn.weights(self, self.activation)
    keep = ffn.dropout_keep(self.dropout, x.shape[:-1] + (wo.shape[0],),
                            deterministic)
    return ffn.apply(x, wi, wo, ("BLM,MH->BLH", "BLH,HM->BLM"),
                     self.activation, self.dtype, keep, self.dropout.rate)
