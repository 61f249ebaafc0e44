"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Every expert e has C slots per group (`moe.slots_per_expert`, the paper's p:
the capacity C of the other layers, filled by mixing instead of routing). Each slot is a convex
mix of all the group's tokens, each token's output a convex mix of all the
slots' outputs (Algorithm 1):

    logits  = X Phi                      f32[G, S, E, C]
    D       = softmax over S (tokens)    dispatch weights, per slot
    X~      = D^T X                      [E, G, C, M]: the slots' inputs
    Y~      = expert_e(X~[e])            [E, G, C, M]
    W       = softmax over (E, C)        combine weights, per token
    Y       = W Y~                       [G, S, M]

Nothing is dropped and no balancing loss is needed: every expert gets
exactly C slots. A slot mixes every token of its group, later ones too, so
Soft MoE is for encoders; a decoder refuses it (`routing.is_causal`), as it
does expert choice. With `normalize` (the paper's §2.3, for large d_model)
X is l2-normalised over M and Phi over M, times a learned scalar.

`SoftMoeLayer` keeps MoeLayer's contract: `[B, L, M] -> ([B, L, M],
moe.MoeOutput)`, its router under `router` (the [M, E * C] Phi as `kernel`)
and experts under `experts`, so freezing, partitioning and the metrics see
it as any MoE layer. Notation: see `switchjax/__init__.py`.
"""
from __future__ import annotations

from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from switchjax import dispatch as dispatch_lib
from switchjax import expert_parallel as expert_parallel_lib
from switchjax import experts as experts_lib
from switchjax import ffn
from switchjax import moe as moe_lib
from switchjax import routing as routing_lib

ROUTER = "soft"


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-6)


class SoftRouter(nnx.Module):
  """Phi f32[M, E * C] (normal(init_std)) and, with `normalize`, its scale."""

  def __init__(self, d_model: int, num_experts: int, slots_per_expert: int, *,
               normalize: bool = False, dtype: Any = jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(stddev=init_std)
    self.kernel = ffn.param(
        init(rngs.params(), (d_model, num_experts * slots_per_expert),
             jnp.float32), ("embed", "unmodeled"))
    self.scale = (ffn.param(jnp.ones((), jnp.float32), ())
                  if normalize else None)
    self.num_experts = num_experts
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x[G, S, M] -> logits f32[G, S, E, C] (computed in `dtype`)."""
    x = x.astype(self.dtype)
    phi = self.kernel[...].astype(self.dtype)
    if self.scale is not None:
      x = _l2_normalize(x, -1)
      phi = self.scale[...].astype(self.dtype) * _l2_normalize(phi, 0)
    phi = phi.reshape(phi.shape[0], self.num_experts, -1)
    return jnp.einsum("GSM,MEC->GSEC", x, phi).astype(jnp.float32)


def soft_metrics(combine: jax.Array) -> routing_lib.RouterMetrics:
  """RouterMetrics of combine weights f32[G, S, E, C]: a token's weight on
  expert e is the sum over e's slots; load is that weight's mean share."""
  per_expert = jnp.sum(combine, axis=-1)  # [G, S, E], sums to 1 per token
  entropy = -jnp.sum(per_expert * jnp.log(per_expert + 1e-9), axis=-1)
  return routing_lib.RouterMetrics(
      dropped_fraction=jnp.zeros((), jnp.float32),
      expert_load=jnp.mean(per_expert, axis=(0, 1)),
      router_confidence=jnp.mean(jnp.max(per_expert, axis=-1)),
      router_entropy=jnp.mean(entropy))


class SoftMoeLayer(nnx.Module):
  """Soft MoE FFN: [B, L, M] -> ([B, L, M], MoeOutput).

  Args:
    d_model, d_ff: M and the experts' hidden H.
    num_experts: E; slots_per_expert: C (slots per expert and group).
    group_size: S, tokens mixed into the slots (0 = one group per sequence,
      the paper's setting).
    normalize: the paper's §2.3 l2 normalisation of X and Phi, with a
      learned scale.
    activation, expert_dropout, expert_impl, init_scale, dtype: the experts'
      (see moe.MoeLayer); router_dtype, router_init_std: Phi's.
    expert_parallel: 'gspmd' only (the slots' buffers are split over
      'expert' as MoeLayer's are).
  """

  def __init__(self, d_model: int, d_ff: int, *, num_experts: int,
               slots_per_expert: int = 1, group_size: int = 0,
               normalize: bool = False, activation: str = "relu",
               expert_dropout: float = 0.0, router_dtype: Any = jnp.float32,
               router_init_std: float = 0.02, expert_parallel: str = "gspmd",
               expert_impl: str = "auto", init_scale: float = 0.1,
               dtype: Any = jnp.float32, deterministic: bool = False,
               rngs: nnx.Rngs):
    if slots_per_expert < 1:
      raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}.")
    if group_size < 0:
      raise ValueError(f"group_size must be >= 0, got {group_size}.")
    if expert_parallel != "gspmd":
      raise ValueError(f"router 'soft' runs with expert_parallel 'gspmd', got "
                       f"{expert_parallel!r}.")
    self.d_model = d_model
    self.num_experts = num_experts
    self.router_name = ROUTER
    self.num_selected = 1  # each slot goes to one expert
    self.slots_per_expert = slots_per_expert
    self.group_size = group_size
    self.dtype = dtype
    self.deterministic = deterministic
    self.router = SoftRouter(d_model, num_experts, slots_per_expert,
                             normalize=normalize, dtype=router_dtype,
                             init_std=router_init_std, rngs=rngs)
    self.experts = experts_lib.Experts(
        num_experts, d_model, d_ff, activation=activation,
        dropout=expert_dropout, init_scale=init_scale, dtype=dtype,
        impl=expert_impl, deterministic=deterministic, rngs=rngs)

  def __call__(self, x: jax.Array, token_ids: Optional[jax.Array] = None
               ) -> tuple[jax.Array, moe_lib.MoeOutput]:
    """x[B, L, M] -> (y[B, L, M] in `dtype`, MoeOutput); token_ids unused
    (MoeLayer's signature)."""
    del token_ids
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"SoftMoeLayer expects tokens [B, L, M={self.d_model}], "
                       f"got shape {x.shape}.")
    groups = dispatch_lib.group_tokens(x, self.group_size or x.shape[1])
    groups = expert_parallel_lib.constrain_groups(groups)
    logits = self.router(groups)  # [G, S, E, C]
    g, s, e, c = logits.shape
    dispatch = jax.nn.softmax(logits, axis=1)  # over tokens, per slot
    combine = jax.nn.softmax(logits.reshape(g, s, e * c), axis=-1).reshape(
        logits.shape)  # over all slots, per token
    dt = self.dtype
    slots = jnp.einsum("GSEC,GSM->EGCM", dispatch.astype(dt), groups.astype(dt))
    slots = expert_parallel_lib.to_experts(slots)
    outputs = self.experts(slots, deterministic=self.deterministic)
    outputs = expert_parallel_lib.from_experts(outputs)
    y = jnp.einsum("GSEC,EGCM->GSM", combine.astype(dt), outputs.astype(dt))
    y = expert_parallel_lib.constrain_groups(y)
    aux = moe_lib.MoeOutput(
        aux_loss=jnp.zeros((), jnp.float32),
        z_loss=routing_lib.router_z_loss(logits.reshape(g, s, e * c)),
        metrics=soft_metrics(combine))
    return y.reshape(x.shape).astype(dt), aux
