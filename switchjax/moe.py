"""The sparse Mixture-of-Experts feed-forward layer (Flax NNX): router + experts.

`MoeLayer` maps tokens `[B, L, M]` to `[B, L, M]`: it cuts the tokens into
groups `[G, S, M]`, computes float32 router logits (`Router`), routes them
with `switchjax.routing`, dispatches tokens into per-expert buffers
`[E, G, C, M]` (`switchjax.dispatch`: 'gather' or the 'einsum' reference),
runs the experts (`switchjax.experts`) and combines their outputs back into
token order; 'dropless' (`switchjax.dropless`) has no capacity. On a device
mesh (traced under `partitioning.in_mesh`) groups stay on their devices and
the experts are split over 'expert': `expert_parallel='gspmd' | 'shard_map'`
(`switchjax.expert_parallel`); the function computed is the same.
Notation: see `switchjax/__init__.py`.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp

from switchjax import dispatch as dispatch_lib
from switchjax import dropless as dropless_lib
from switchjax import expert_parallel as expert_parallel_lib
from switchjax import experts as experts_lib
from switchjax import ffn
from switchjax import hash_router
from switchjax import loss_free
from switchjax import partitioning
from switchjax import routing as routing_lib

# The router computes in float32 ("selective precision"); bfloat16 only to
# reproduce Switch's instability ablation.
ROUTER_DTYPES = ("float32", "bfloat16")


@flax.struct.dataclass
class MoeOutput:
  """Side outputs of one MoE layer call.

  aux_loss: f32[] the router's load-balancing loss, unscaled.
  z_loss:   f32[] router z-loss (ST-MoE eq. 5) of the logits, unscaled.
  metrics:  routing.RouterMetrics.
  """
  aux_loss: jax.Array
  z_loss: jax.Array
  metrics: routing_lib.RouterMetrics


class Router(nnx.Module):
  """Linear router M -> E without bias, in float32 whatever the model dtype.

  Switch's "selective precision": the input is cast to `dtype` (float32 unless
  reproducing the bfloat16-router instability ablation). In training,
  `jitter > 0` multiplies the router's input (not the experts') by
  U(1 - jitter, 1 + jitter). With `noisy=True` a second kernel gives the noise
  logits x W_noise of Shazeer et al. 2017, which `routing.noisy_topk` turns into
  H = x W + N(0, 1) * softplus(x W_noise). Both kernels start from
  normal(init_std) (Shazeer starts them at zero; a zero router kernel makes
  every token tie, so we keep the Switch init for both). `balance_bias=True`
  adds loss-free balancing's bias f32[E], zeros at init
  (switchjax/loss_free.py).
  """

  def __init__(self, d_model: int, num_experts: int, *, noisy: bool = False,
               jitter: float = 0.0, dtype: Any = jnp.float32,
               init_std: float = 0.02, deterministic: bool = False,
               balance_bias: bool = False, rngs: nnx.Rngs):
    if not 0.0 <= jitter < 1.0:
      raise ValueError(f"router jitter must be in [0, 1), got {jitter}.")
    init = jax.nn.initializers.normal(stddev=init_std)
    # Small ([M, E]) and read by every token: kept whole on every device.
    names = ("embed", "unmodeled")
    self.kernel = ffn.param(init(rngs.params(), (d_model, num_experts), jnp.float32), names)
    self.noise_kernel = (
        ffn.param(init(rngs.params(), (d_model, num_experts), jnp.float32), names)
        if noisy else None)
    if balance_bias:  # an attribute only when used: other routers' state is unchanged
      setattr(self, loss_free.BIAS,
              ffn.param(jnp.zeros((num_experts,), jnp.float32), ("unmodeled",)))
    self.jitter = jitter
    self.dtype = dtype
    self.deterministic = deterministic
    self.rngs = ffn.fork_stream(rngs, ("router", "dropout")) if jitter > 0 else None
    if jitter > 0 and self.rngs is None:
      raise ValueError("Router jitter needs an rng stream 'router' or 'dropout' in rngs.")

  def __call__(self, x: jax.Array, *, deterministic: Optional[bool] = None
               ) -> tuple[jax.Array, Optional[jax.Array]]:
    """x[..., M] -> (logits[..., E], noise logits[..., E] or None), in `dtype`."""
    deterministic = self.deterministic if deterministic is None else deterministic
    x = x.astype(self.dtype)
    if self.jitter > 0 and not deterministic:
      x = x * jax.random.uniform(self.rngs(), x.shape, self.dtype,
                                 1.0 - self.jitter, 1.0 + self.jitter)
    logits = jnp.einsum("...M,ME->...E", x, self.kernel[...].astype(self.dtype))
    if self.noise_kernel is None:
      return logits, None
    noise = jnp.einsum("...M,ME->...E", x, self.noise_kernel[...].astype(self.dtype))
    return logits, noise


class MoeLayer(nnx.Module):
  """Sparse feed-forward layer: router, E experts, dispatch and combine.

  `deterministic` (set recursively by `model.eval()` / `model.train()`) picks
  the eval capacity factor and turns off router jitter, router noise
  (noisy_topk), expert dropout and GShard's random second-expert policy (at
  eval every second choice is kept, policy 'all', so eval is deterministic).

  The capacity per group is `routing.expert_capacity(S, E, capacity_factor,
  K, min_capacity)`, capped at S (an expert can take each token at most once,
  so more slots stay empty). Randomness (jitter, noise, policy 'random',
  dropout) comes from streams forked from `rngs` at construction: 'router'
  (or else 'dropout') for the router, 'dropout' for expert dropout. A plain
  `nnx.Rngs(0)` serves all of them.

  Args:
    d_model: M.
    d_ff: H, each expert's hidden dim.
    num_experts: E.
    router: one of routing.ROUTERS.
    num_selected: K for 'topk' and 'noisy_topk'; the other routers fix K
      (routing.FIXED_K: switch 1, gshard 2, expert_choice 1, where the
      capacity factor is the average number of experts per token).
    train_capacity_factor, eval_capacity_factor: capacity factor in training
      and in deterministic (eval) mode.
    min_capacity: the least capacity per expert and group.
    group_size: S, tokens per routing group (min(S, B * L) is used); 0 = one
      group per sequence (S = L, as Hugging Face's Switch routes).
    expert_capacity: > 0 fixes C (capped at S) whatever the mode and factor,
      as Hugging Face's `expert_capacity`; 0 = from the capacity factor.
    activation: one of ffn.ACTIVATIONS.
    expert_dropout: dropout rate on the experts' hidden activations.
    router_jitter: eps of the multiplicative U(1 - eps, 1 + eps) noise on the
      router input, training only.
    router_dtype: the router's compute dtype (float32; bfloat16 for the
      instability ablation).
    router_init_std: std of the router kernel's normal init.
    second_expert_policy: 'gshard': 'all' or 'random'.
    normalize_weights: 'topk': renormalise the K weights to sum to 1.
    batch_prioritized: claim slots in order of top gate (V-MoE BPR).
    dispatch: one of dispatch.DISPATCHES (or an alias such as 'fast').
    expert_parallel: one of expert_parallel.PATHS (used on a mesh).
    expert_impl: one of experts.EXPERT_IMPLS.
    init_scale: Switch's weight init scale s of the experts.
    dtype: the experts' compute dtype (params are float32).
    deterministic: eval mode.
    vocab_size: V, for router 'hash' (its table maps every id to an expert).
    score_func, routed_scaling_factor: router 'loss_free''s scores
      ('sigmoid' or 'softmax') and the factor on its combine weights.
    rngs: 'params' for the init, 'dropout' / 'router' streams.
  """

  def __init__(self, d_model: int, d_ff: int, *, num_experts: int,
               router: str = "switch", num_selected: int = 1,
               train_capacity_factor: float = 1.25,
               eval_capacity_factor: float = 2.0, min_capacity: int = 4,
               group_size: int = 1024, expert_capacity: int = 0,
               activation: str = "relu",
               expert_dropout: float = 0.0, router_jitter: float = 0.0,
               router_dtype: Any = jnp.float32, router_init_std: float = 0.02,
               second_expert_policy: str = "all",
               normalize_weights: bool = True, batch_prioritized: bool = False,
               dispatch: str = "gather", expert_parallel: str = "gspmd",
               expert_impl: str = "auto", init_scale: float = 0.1,
               dtype: Any = jnp.float32, deterministic: bool = False,
               vocab_size: int = 0, score_func: str = "sigmoid",
               routed_scaling_factor: float = 1.0, rngs: nnx.Rngs):
    dispatch = dispatch_lib.canonical(dispatch)
    experts_lib.check_choice("router", router, routing_lib.ROUTERS)
    if router == "soft":
      raise ValueError("router 'soft' is switchjax.soft_moe.SoftMoeLayer, "
                       "not a MoeLayer router.")
    experts_lib.check_choice("dispatch", dispatch, dispatch_lib.DISPATCHES)
    experts_lib.check_choice("expert_parallel", expert_parallel, expert_parallel_lib.PATHS)
    experts_lib.check_choice("second_expert_policy", second_expert_policy,
                  routing_lib.SECOND_EXPERT_POLICIES)
    k = routing_lib.experts_per_token(router, num_selected)
    if not 1 <= k <= num_experts:
      raise ValueError(f"experts per token K={k} (router {router!r}, "
                       f"num_selected={num_selected}) must be in [1, "
                       f"num_experts={num_experts}].")
    for name, value in (("train_capacity_factor", train_capacity_factor),
                        ("eval_capacity_factor", eval_capacity_factor),
                        ("min_capacity", min_capacity)):
      if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    for name, value in (("group_size", group_size),
                        ("expert_capacity", expert_capacity)):
      if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    if dispatch == "dropless" and router == "expert_choice":
      raise ValueError("dispatch 'dropless' needs a token-choice router.")

    self.d_model = d_model
    self.num_experts = num_experts
    self.router_name = router
    self.num_selected = k
    self.train_capacity_factor = train_capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.min_capacity = min_capacity
    self.group_size = group_size
    self.expert_capacity = expert_capacity
    self.second_expert_policy = second_expert_policy
    self.normalize_weights = normalize_weights
    self.batch_prioritized = batch_prioritized
    self.dispatch = dispatch
    self.expert_parallel = expert_parallel
    self.dtype = dtype
    self.deterministic = deterministic
    self.score_func = score_func
    self.routed_scaling_factor = routed_scaling_factor

    self.router = (
        hash_router.HashRouter(vocab_size, num_experts)
        if router == hash_router.ROUTER else
        Router(d_model, num_experts, noisy=router == "noisy_topk",
               jitter=router_jitter, dtype=router_dtype,
               init_std=router_init_std, deterministic=deterministic,
               balance_bias=router == loss_free.ROUTER, rngs=rngs))
    self.experts = experts_lib.Experts(
        num_experts, d_model, d_ff, activation=activation,
        dropout=expert_dropout, init_scale=init_scale, dtype=dtype,
        impl=expert_impl, deterministic=deterministic, rngs=rngs)
    needs_rng = router == "noisy_topk" or (
        router == "gshard" and second_expert_policy == "random")
    self.rngs = ffn.fork_stream(rngs, ("router", "dropout")) if needs_rng else None
    if needs_rng and self.rngs is None:
      raise ValueError(
          f"router {router!r} with policy {second_expert_policy!r} needs an rng "
          "stream 'router' or 'dropout' in rngs.")

  def capacity(self, tokens_per_group: int) -> int:
    """Expert capacity C for groups of `tokens_per_group` in the current mode.

    Dropless dispatch: S, so that the router never drops a choice for room.
    """
    if self.dispatch == "dropless":
      return tokens_per_group
    if self.expert_capacity > 0:
      return min(self.expert_capacity, tokens_per_group)
    factor = (self.eval_capacity_factor if self.deterministic
              else self.train_capacity_factor)
    capacity = routing_lib.expert_capacity(
        tokens_per_group, self.num_experts, factor,
        num_selected=self.num_selected, min_capacity=self.min_capacity)
    return min(capacity, tokens_per_group)

  def route(self, x: jax.Array, token_ids: Optional[jax.Array] = None
            ) -> tuple[routing_lib.Routing, Optional[jax.Array]]:
    """x[G, S, M] (token_ids i32[G, S]) -> (Routing, router logits [G, S, E]
    in router_dtype, f32 by default; None for hash routing)."""
    if self.router_name == hash_router.ROUTER:
      if token_ids is None:
        raise ValueError("router 'hash' needs the token ids of its inputs.")
      return routing_lib.hash_top1(self.router(token_ids), self.num_experts,
                                   self.capacity(x.shape[1])), None
    deterministic = self.deterministic
    logits, noise_logits = self.router(x, deterministic=deterministic)
    if self.router_name == loss_free.ROUTER:
      return loss_free.topk(
          logits, getattr(self.router, loss_free.BIAS)[...],
          self.capacity(x.shape[1]), self.num_selected,
          score_func=self.score_func, normalize_weights=self.normalize_weights,
          scaling=self.routed_scaling_factor), logits
    policy = self.second_expert_policy
    rng = None
    if not deterministic and self.rngs is not None:
      rng = self.rngs()
    if deterministic and policy == "random":
      policy = "all"
    routing = routing_lib.route(
        self.router_name, logits, self.capacity(x.shape[1]),
        num_selected=self.num_selected, rng=rng, noise_logits=noise_logits,
        second_expert_policy=policy, normalize_weights=self.normalize_weights,
        batch_prioritized=self.batch_prioritized)
    return routing, logits

  def _shard_map_experts(self, groups: jax.Array,
                         routing: routing_lib.Routing) -> jax.Array:
    """Dispatch, batched experts and combine with explicit all-to-alls."""
    experts = self.experts
    wi, wo = experts.weights()
    names = ffn.wi_names(experts.activation)
    keep = experts.dropout_keep(
        (self.num_experts, groups.shape[0], routing.capacity, wo.shape[1]),
        self.deterministic)

    def expert_fn(buffers, weights, keep):
      return ffn.apply(buffers, tuple(weights[n] for n in names),
                       weights["wo"], experts_lib.BATCHED_SPECS,
                       experts.activation, experts.dtype, keep,
                       experts.dropout.rate)

    dispatch_fn, combine_fn = dispatch_lib.functions(self.dispatch)
    return expert_parallel_lib.shard_map_experts(
        groups, routing, weights={**dict(zip(names, wi)), "wo": wo},
        expert_fn=expert_fn, dispatch_fn=dispatch_fn, combine_fn=combine_fn,
        keep=keep)

  def _buffered_experts(self, groups: jax.Array,
                        routing: routing_lib.Routing) -> jax.Array:
    """Dispatch into [E, G, C, M] buffers, experts, combine (GSPMD on a mesh)."""
    dispatch, combine = dispatch_lib.functions(self.dispatch)
    if partitioning.current_mesh() is not None:
      # Group by group, so that XLA keeps the groups where they are.
      dispatch = functools.partial(
          expert_parallel_lib.per_group(dispatch), x_axis=0, out_axis=1)
      combine = functools.partial(
          expert_parallel_lib.per_group(combine), x_axis=1, out_axis=0)
    buffers = dispatch(groups, routing)
    # GSPMD: E over 'expert' for the experts (an all-to-all), and back.
    buffers = expert_parallel_lib.to_experts(buffers)
    outputs = self.experts(buffers, deterministic=self.deterministic)
    outputs = expert_parallel_lib.from_experts(outputs)
    return combine(outputs, routing)

  def __call__(self, x: jax.Array, token_ids: Optional[jax.Array] = None
               ) -> tuple[jax.Array, MoeOutput]:
    """x[B, L, M] -> (y[B, L, M] in `dtype`, MoeOutput); token_ids i32[B, L]
    are what hash routing reads (other routers ignore them)."""
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(
          f"MoeLayer expects tokens [B, L, M={self.d_model}], got shape {x.shape}.")
    # [G, S, M]; group_size 0: each sequence is a group.
    groups = dispatch_lib.group_tokens(x, self.group_size or x.shape[1])
    # On a mesh: whole groups per device, routed where they are.
    groups = expert_parallel_lib.constrain_groups(groups)
    ids = None if token_ids is None else token_ids.reshape(groups.shape[:2])
    routing, logits = self.route(groups, ids)
    groups = groups.astype(self.dtype)
    if self.dispatch == "dropless":
      y = dropless_lib.apply(groups, routing, self.experts,
                             deterministic=self.deterministic)
    elif expert_parallel_lib.uses_shard_map(self.expert_parallel):
      y = self._shard_map_experts(groups, routing)
    else:
      y = self._buffered_experts(groups, routing)
    y = expert_parallel_lib.constrain_groups(y)
    z_loss = (jnp.zeros((), jnp.float32) if logits is None else
              routing_lib.router_z_loss(logits.astype(jnp.float32)))
    aux = MoeOutput(aux_loss=routing.aux_loss, z_loss=z_loss,
                    metrics=routing.metrics)
    return y.reshape(x.shape).astype(self.dtype), aux
