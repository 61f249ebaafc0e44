"""Feed-forward math shared by every expert path: init, activation, dropout mask.

The dense FFN (`experts.MlpBlock`), the batched and per-expert loop paths
(`experts.Experts`, `expert_loop`), the dropless grouped matmuls (`dropless`)
and the shard_map expert-parallel path (`expert_parallel`) all compute

    y = dropout(act(x wi)) wo        act: relu, or gelu(x wi_0) * (x wi_1)
                                     (T5.1.1), or silu(x wi_0) * (x wi_1)
                                     (SwiGLU: Llama, Mixtral)

with the functions below, so the activation and the expert-dropout draw are
written once. Weights are float32 params; `pre`/`hidden` run in the compute
dtype. Notation: see `switchjax/__init__.py`.
"""
from __future__ import annotations

from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp

ACTIVATIONS = ("relu", "gated_gelu", "swiglu")
# Gated activations: act(x wi_0) * (x wi_1), two input weights.
GATED = ("gated_gelu", "swiglu")


def wi_names(activation: str) -> tuple[str, ...]:
  """Input-weight names: ('wi',), or ('wi_0', 'wi_1') for a gated activation."""
  return ("wi_0", "wi_1") if activation in GATED else ("wi",)


def init(init_scale: float):
  """Switch §2.4: truncated normal, std sqrt(init_scale / fan_in), cut at 2 std.

  `variance_scaling` corrects the std for the truncation, so the drawn weights
  have the paper's std; fan_in is the second-to-last axis (the leading expert
  axis of stacked weights is a batch axis).
  """
  def init_fn(key, shape, dtype=jnp.float32):
    # Only stacked [E, M, H] weights have a batch (expert) axis; on a 2-D
    # [M, H] weight axis 0 is the fan-in axis itself.
    batch = (0,) if len(shape) > 2 else ()
    return jax.nn.initializers.variance_scaling(
        init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
        batch_axis=batch)(key, shape, dtype)
  return init_fn


def param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
  """A parameter tagged with logical axis names (see switchjax.partitioning)."""
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def make_params(module: nnx.Module, shape_in: tuple[int, ...],
                shape_out: tuple[int, ...], activation: str, init_scale: float,
                rngs: nnx.Rngs, names_in: tuple[str, ...],
                names_out: tuple[str, ...]) -> None:
  """Creates the wi_names(activation) weights and wo on `module`, in that order."""
  init_fn = init(init_scale)
  for name in wi_names(activation):
    setattr(module, name,
            param(init_fn(rngs.params(), shape_in, jnp.float32), names_in))
  module.wo = param(init_fn(rngs.params(), shape_out, jnp.float32), names_out)


def weights(module: nnx.Module, activation: str
            ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """(wi tuple, wo) of a module made by `make_params`, as float32 arrays."""
  return (tuple(getattr(module, n)[...] for n in wi_names(activation)),
          module.wo[...])


def activate(pre: tuple[jax.Array, ...], activation: str) -> jax.Array:
  """Pre-activations (x wi,) or (x wi_0, x wi_1) -> hidden activations.

  T5.1.1's gated GELU is gelu(x wi_0) * (x wi_1), tanh-approximate as in T5X;
  SwiGLU (Shazeer 2020) is silu(x wi_0) * (x wi_1), Mixtral's w1 and w3.
  """
  if activation == "gated_gelu":
    return jax.nn.gelu(pre[0], approximate=True) * pre[1]
  if activation == "swiglu":
    return jax.nn.silu(pre[0]) * pre[1]
  return jax.nn.relu(pre[0])


def hidden(x: jax.Array, wi: tuple[jax.Array, ...], spec: str,
           activation: str, dtype: Any) -> jax.Array:
  """act(x wi) with `spec` the einsum of one wi, weights cast to `dtype`."""
  return activate(tuple(jnp.einsum(spec, x, w.astype(dtype)) for w in wi),
                  activation)


def apply(x: jax.Array, wi: tuple[jax.Array, ...], wo: jax.Array,
          specs: tuple[str, str], activation: str, dtype: Any,
          keep: Optional[jax.Array], rate: float) -> jax.Array:
  """The FFN in one einsum per weight: x -> dropout(act(x wi)) wo, in `dtype`.

  specs: the einsums of wi and of wo, e.g. ('EGCM,EMH->EGCH',
  'EGCH,EHM->EGCM'); keep: the dropout mask of the hidden activations from
  `dropout_keep` (None = no dropout).
  """
  h = hidden(x.astype(dtype), wi, specs[0], activation, dtype)
  h = apply_dropout(h, keep, rate)
  return jnp.einsum(specs[1], h, wo.astype(dtype))


def fork_stream(rngs: nnx.Rngs, names: tuple[str, ...]
                ) -> Optional[nnx.RngStream]:
  """Private stream forked from the first of `names` that `rngs` has.

  A plain `nnx.Rngs(0)` answers every name with its default stream, so this
  works with it as well as with `nnx.Rngs(params=..., dropout=...)`.
  """
  for name in names:
    try:
      return rngs[name].fork()
    except (KeyError, AttributeError):
      continue
  return None


def make_dropout(rate: float, deterministic: bool, rngs: nnx.Rngs) -> nnx.Dropout:
  """Hidden-activation dropout drawing from a fork of 'dropout' when rate > 0."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
  stream = fork_stream(rngs, ("dropout",)) if rate > 0 else None
  if rate > 0 and stream is None:
    raise ValueError("dropout > 0 needs an rng stream 'dropout' in rngs.")
  return nnx.Dropout(rate, deterministic=deterministic, rngs=stream)


def dropout_keep(dropout: nnx.Dropout, shape: tuple[int, ...],
                 deterministic: Optional[bool] = None) -> Optional[jax.Array]:
  """bool[shape] units kept by `dropout`'s next draw; None when it is off.

  The draw nnx.Dropout makes for inputs of `shape` (its key, keep
  probability and shape), so every path drops the same units. Drawn once for
  the global shape: under a mesh each device computes only its part
  (jax_threefry_partitionable) and sees what one device would.
  """
  off = dropout.deterministic if deterministic is None else deterministic
  if dropout.rate == 0.0 or off:
    return None
  return jax.random.bernoulli(dropout.rngs(), 1.0 - dropout.rate, shape)


def apply_dropout(h: jax.Array, keep: Optional[jax.Array],
                  rate: float) -> jax.Array:
  """Inverted dropout with mask `keep` (nnx.Dropout's arithmetic)."""
  if keep is None:
    return h
  return jax.lax.select(jnp.broadcast_to(keep, h.shape), h / (1.0 - rate),
                        jnp.zeros_like(h))
