"""The sparse Mixture-of-Experts feed-forward layer (Flax NNX).

Notation: G groups, S tokens per group, E experts, C expert capacity, K experts
per token, M model dim, H expert hidden dim.

`MoeLayer` maps tokens `[B, L, M]` to `[B, L, M]`: it cuts the tokens into
groups `[G, S, M]`, computes float32 router logits, routes them with
`switchjax.routing`, dispatches tokens into per-expert buffers `[E, G, C, M]`,
runs the experts and combines their outputs back into token order. A token
that reaches no expert comes out as a zero row (the model's residual connection
carries it).

Two interchangeable dispatch paths compute the same function:

- "einsum": the GShard / flaxformer reference, one-hot `[G, S, E, C]` dispatch
  and combine tensors contracted with einsums ('GSEC,GSM->EGCM' and
  'GSEC,EGCM->GSM'). Memory and FLOPs grow with S * E * C.
- "fast" (default): gathers tokens by `Routing.token_index` and gathers the
  expert outputs back by `Routing.slot_index` (token-choice routers) or
  scatter-adds them by `token_index` (expert choice). Never builds `[G, S, E, C]`.

A third, "dropless" (`switchjax.dropless`), has no capacity: every choice is
computed by grouped matmuls (`jax.lax.ragged_dot`); for GPU/TPU, slow on CPU.
The experts' matmuls run batched over E or one expert at a time (`expert_impl`,
see `Experts`); every combination computes the same function.

Dispatch, experts and combine are separate functions so that sharding
constraints / a shard_map all-to-all can wrap each one. On a device mesh
(traced under `partitioning.in_mesh`) groups stay on their devices and the
experts are split over 'expert': `expert_parallel='gspmd' | 'shard_map'`
(`switchjax.expert_parallel`); the function computed is the same.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp

from switchjax import dropless as dropless_lib
from switchjax import expert_loop
from switchjax import expert_parallel as expert_parallel_lib
from switchjax import partitioning
from switchjax import routing as routing_lib

ROUTERS = routing_lib.ROUTERS
DISPATCHES = ("fast", "einsum", "dropless")
ACTIVATIONS = ("relu", "gated_gelu")
# How Experts runs its E matmuls: one batched einsum, a loop over experts
# (lax.map), or "auto" (the loop on CPU unless the experts are split over
# devices; batched elsewhere).
EXPERT_IMPLS = ("auto", "batched", "loop")

# Experts each token is sent to, for routers whose K is fixed by the algorithm.
_FIXED_K = {"switch": 1, "gshard": 2, "expert_choice": 1}


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


def _fork_stream(rngs: nnx.Rngs, names: tuple[str, ...]) -> Optional[nnx.RngStream]:
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


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"Unknown {name} {value!r}; expected one of {allowed}.")


def _ffn_init(init_scale: float):
  """Switch §2.4: truncated normal, std sqrt(init_scale / fan_in), cut at 2 std.

  `variance_scaling` corrects the std for the truncation, so the drawn weights
  have the paper's std; fan_in is the second-to-last axis (the leading expert
  axis of stacked weights is a batch axis).
  """
  def init(key, shape, dtype=jnp.float32):
    # Only stacked [E, M, H] weights have a batch (expert) axis; on a 2-D
    # [M, H] weight axis 0 is the fan-in axis itself.
    batch = (0,) if len(shape) > 2 else ()
    return jax.nn.initializers.variance_scaling(
        init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
        batch_axis=batch)(key, shape, dtype)
  return init


def _param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
  """A parameter tagged with logical axis names (see switchjax.partitioning)."""
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _ffn_params(module: nnx.Module, shape_in: tuple[int, ...],
                shape_out: tuple[int, ...], activation: str, init_scale: float,
                rngs: nnx.Rngs, names_in: tuple[str, ...],
                names_out: tuple[str, ...]) -> None:
  """Creates wi (or wi_0, wi_1 for gated activations) and wo on `module`."""
  init = _ffn_init(init_scale)
  if activation == "gated_gelu":
    module.wi_0 = _param(init(rngs.params(), shape_in, jnp.float32), names_in)
    module.wi_1 = _param(init(rngs.params(), shape_in, jnp.float32), names_in)
  else:
    module.wi = _param(init(rngs.params(), shape_in, jnp.float32), names_in)
  module.wo = _param(init(rngs.params(), shape_out, jnp.float32), names_out)


def _ffn_hidden(module: nnx.Module, x: jax.Array, spec: str, activation: str,
                dtype: Any) -> jax.Array:
  """x @ wi then the activation; `spec` is the einsum for one wi."""
  if activation == "gated_gelu":
    # T5.1.1: gelu(x wi_0) * (x wi_1); tanh-approximate gelu as in T5X.
    h0 = jnp.einsum(spec, x, module.wi_0[...].astype(dtype))
    h1 = jnp.einsum(spec, x, module.wi_1[...].astype(dtype))
    return jax.nn.gelu(h0, approximate=True) * h1
  return jax.nn.relu(jnp.einsum(spec, x, module.wi[...].astype(dtype)))


def _dropout(rate: float, deterministic: bool, rngs: nnx.Rngs) -> nnx.Dropout:
  """Hidden-activation dropout drawing from the 'dropout' stream when rate > 0."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
  stream = _fork_stream(rngs, ("dropout",)) if rate > 0 else None
  if rate > 0 and stream is None:
    raise ValueError("dropout > 0 needs an rng stream 'dropout' in rngs.")
  return nnx.Dropout(rate, deterministic=deterministic, rngs=stream)


class Router(nnx.Module):
  """Linear router M -> E without bias, in float32 whatever the model dtype.

  Switch's "selective precision": the input is cast to `dtype` (float32 unless
  reproducing the bfloat16-router instability ablation). In training,
  `jitter > 0` multiplies the router's input (not the experts') by
  U(1 - jitter, 1 + jitter). With `noisy=True` a second kernel gives the noise
  logits x W_noise of Shazeer et al. 2017, which `routing.noisy_topk` turns into
  H = x W + N(0, 1) * softplus(x W_noise). Both kernels start from
  normal(init_std) (Shazeer starts them at zero; a zero router kernel makes
  every token tie, so we keep the Switch init for both).
  """

  def __init__(self, d_model: int, num_experts: int, *, noisy: bool = False,
               jitter: float = 0.0, dtype: Any = jnp.float32,
               init_std: float = 0.02, deterministic: bool = False,
               rngs: nnx.Rngs):
    if not 0.0 <= jitter < 1.0:
      raise ValueError(f"router jitter must be in [0, 1), got {jitter}.")
    init = jax.nn.initializers.normal(stddev=init_std)
    # Small ([M, E]) and read by every token: kept whole on every device.
    names = ("embed", "unmodeled")
    self.kernel = _param(init(rngs.params(), (d_model, num_experts), jnp.float32), names)
    self.noise_kernel = (
        _param(init(rngs.params(), (d_model, num_experts), jnp.float32), names)
        if noisy else None)
    self.jitter = jitter
    self.dtype = dtype
    self.deterministic = deterministic
    self.rngs = _fork_stream(rngs, ("router", "dropout")) if jitter > 0 else None
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


def _expert_loop_default() -> bool:
  """Experts impl 'auto': loop over experts on CPU unless they are split over devices.

  On CPU, one matmul per expert is as fast as XLA's batched matmul over E at
  E=8 and faster with many small experts (E=128: 0.69x the time,
  benchmarks/moe_breakdown.py); on GPU/TPU the batched einsum is the fast one. A loop over an axis that the
  mesh splits ('expert' > 1) would gather the weights: keep the einsum there.
  """
  if jax.default_backend() != "cpu":
    return False
  mesh = partitioning.current_mesh()
  return mesh is None or partitioning.axes_size(
      partitioning.axes_of("expert", mesh), mesh) == 1


class Experts(nnx.Module):
  """E feed-forward networks with stacked weights, applied to dispatched buffers.

  wi: f32[E, M, H] (wi_0 and wi_1 for 'gated_gelu'), wo: f32[E, H, M]. Computes
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
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("expert impl", impl, EXPERT_IMPLS)
    _ffn_params(self, (num_experts, d_model, d_ff), (num_experts, d_ff, d_model),
                activation, init_scale, rngs,
                ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed"))
    self.activation = activation
    self.dtype = dtype
    self.impl = impl
    self.dropout = _dropout(dropout, deterministic, rngs)

  def uses_loop(self) -> bool:
    """Whether calls run one expert at a time (impl 'loop', or 'auto' on CPU)."""
    return self.impl == "loop" or (self.impl == "auto" and _expert_loop_default())

  def dropout_mask(self, shape: tuple[int, ...],
                   deterministic: Optional[bool] = None) -> Optional[jax.Array]:
    """Expert-dropout multiplier (0 or 1/keep) for hidden activations; None when off.

    The same nnx.Dropout draw (rng, shape) as dropout applied to the batched
    hidden activations, so every impl drops the same units.
    """
    off = self.dropout.deterministic if deterministic is None else deterministic
    if self.dropout.rate == 0.0 or off:
      return None
    return self.dropout(jnp.ones(shape, self.dtype), deterministic=False)

  def _loop(self, x: jax.Array, deterministic: Optional[bool]) -> jax.Array:
    """x[E, G, C, M] -> [E, G, C, M], one expert's 2-D matmuls at a time."""
    e, g, c, m = x.shape
    names = ("wi_0", "wi_1") if self.activation == "gated_gelu" else ("wi",)
    wi = tuple(getattr(self, n)[...] for n in names)
    mask = self.dropout_mask((e, g, c, wi[0].shape[2]), deterministic)
    if mask is not None:
      mask = mask.reshape(e, g * c, -1)
    y = expert_loop.ffn(x.reshape(e, g * c, m), wi, self.wo[...], mask,
                        self.activation, self.dtype)
    return y.reshape(e, g, c, m)

  def __call__(self, x: jax.Array, *, deterministic: Optional[bool] = None) -> jax.Array:
    """x[E, G, C, M] -> [E, G, C, M] in `dtype`."""
    x = x.astype(self.dtype)
    if self.uses_loop():
      return self._loop(x, deterministic)
    h = _ffn_hidden(self, x, "EGCM,EMH->EGCH", self.activation, self.dtype)
    h = self.dropout(h, deterministic=deterministic)
    return jnp.einsum("EGCH,EHM->EGCM", h, self.wo[...].astype(self.dtype))


class MlpBlock(nnx.Module):
  """Dense feed-forward block, FLOP-matched to a K=1 MoE layer of equal H.

  wi: f32[M, H] (wi_0 and wi_1 for 'gated_gelu'), wo: f32[H, M]; same
  activations and init as `Experts`; `dropout` on the hidden activations.
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu",
               dropout: float = 0.0, init_scale: float = 0.1,
               dtype: Any = jnp.float32, deterministic: bool = False,
               rngs: nnx.Rngs):
    _check_choice("activation", activation, ACTIVATIONS)
    _ffn_params(self, (d_model, d_ff), (d_ff, d_model), activation, init_scale,
                rngs, ("embed", "mlp"), ("mlp", "embed"))
    self.activation = activation
    self.dtype = dtype
    self.dropout = _dropout(dropout, deterministic, rngs)

  def __call__(self, x: jax.Array, *, deterministic: Optional[bool] = None) -> jax.Array:
    """x[B, L, M] -> [B, L, M] in `dtype`."""
    x = x.astype(self.dtype)
    h = _ffn_hidden(self, x, "BLM,MH->BLH", self.activation, self.dtype)
    h = self.dropout(h, deterministic=deterministic)
    return jnp.einsum("BLH,HM->BLM", h, self.wo[...].astype(self.dtype))


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


def combine_fast(y: jax.Array, routing: routing_lib.Routing) -> jax.Array:
  """Gather when the routing has a token-major view, scatter-add otherwise."""
  if routing.slot_index is not None:
    return combine_gather(y, routing)
  return combine_scatter(y, routing)


class MoeLayer(nnx.Module):
  """Sparse feed-forward layer: router, E experts, dispatch and combine.

  `deterministic` (set recursively by `model.eval()` / `model.train()`) picks
  the eval capacity factor and turns off router jitter, router noise
  (noisy_topk), expert dropout and GShard's random second-expert policy (at
  eval every second choice is kept, policy 'all', so eval is deterministic).

  K (experts per token) is fixed by the router for 'switch' (1), 'gshard' (2)
  and 'expert_choice' (1: there the capacity factor is the average number of
  experts per token, Zhou et al. 2022), and is `num_selected` for 'topk' and
  'noisy_topk'. The capacity per group is
  `routing.expert_capacity(S, E, capacity_factor, K, min_capacity)`, capped at
  S (an expert can take each token at most once, so more slots stay empty).

  Randomness (jitter, noise, policy 'random', dropout) comes from streams forked
  from `rngs` at construction: 'router' (or else 'dropout') for the router,
  'dropout' for expert dropout. A plain `nnx.Rngs(0)` serves all of them.
  """

  def __init__(self, d_model: int, d_ff: int, *, num_experts: int,
               router: str = "switch", num_selected: int = 1,
               train_capacity_factor: float = 1.25,
               eval_capacity_factor: float = 2.0, min_capacity: int = 4,
               group_size: int = 1024, activation: str = "relu",
               expert_dropout: float = 0.0, router_jitter: float = 0.0,
               router_dtype: Any = jnp.float32, router_init_std: float = 0.02,
               second_expert_policy: str = "all",
               normalize_weights: bool = True, batch_prioritized: bool = False,
               dispatch: str = "fast", expert_parallel: str = "gspmd",
               expert_impl: str = "auto", init_scale: float = 0.1,
               dtype: Any = jnp.float32, deterministic: bool = False,
               rngs: nnx.Rngs):
    _check_choice("router", router, ROUTERS)
    _check_choice("dispatch", dispatch, DISPATCHES)
    _check_choice("expert_parallel", expert_parallel, expert_parallel_lib.PATHS)
    _check_choice("second_expert_policy", second_expert_policy, ("all", "random"))
    if num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
    if router == "gshard" and num_experts < 2:
      raise ValueError("router 'gshard' picks 2 experts per token; needs num_experts >= 2.")
    if router in ("topk", "noisy_topk") and not 1 <= num_selected <= num_experts:
      raise ValueError(
          f"num_selected={num_selected} must be in [1, num_experts={num_experts}].")
    for name, cf in (("train_capacity_factor", train_capacity_factor),
                     ("eval_capacity_factor", eval_capacity_factor)):
      if cf <= 0:
        raise ValueError(f"{name} must be > 0, got {cf}.")
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}.")
    if dispatch == "dropless" and router == "expert_choice":
      raise ValueError(
          "dispatch 'dropless' needs a token-choice router; 'expert_choice' "
          "picks a fixed number of tokens per expert (use 'fast' or 'einsum').")

    self.d_model = d_model
    self.num_experts = num_experts
    self.router_name = router
    self.num_selected = _FIXED_K.get(router, num_selected)
    self.train_capacity_factor = train_capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.min_capacity = min_capacity
    self.group_size = group_size
    self.second_expert_policy = second_expert_policy
    self.normalize_weights = normalize_weights
    self.batch_prioritized = batch_prioritized
    self.dispatch = dispatch
    self.expert_parallel = expert_parallel
    self.dtype = dtype
    self.deterministic = deterministic

    self.router = Router(d_model, num_experts, noisy=router == "noisy_topk",
                         jitter=router_jitter, dtype=router_dtype,
                         init_std=router_init_std, deterministic=deterministic,
                         rngs=rngs)
    self.experts = Experts(num_experts, d_model, d_ff, activation=activation,
                           dropout=expert_dropout, init_scale=init_scale,
                           dtype=dtype, impl=expert_impl,
                           deterministic=deterministic, rngs=rngs)
    needs_rng = router == "noisy_topk" or (
        router == "gshard" and second_expert_policy == "random")
    self.rngs = _fork_stream(rngs, ("router", "dropout")) if needs_rng else None
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
    factor = (self.eval_capacity_factor if self.deterministic
              else self.train_capacity_factor)
    capacity = routing_lib.expert_capacity(
        tokens_per_group, self.num_experts, factor,
        num_selected=self.num_selected, min_capacity=self.min_capacity)
    return min(capacity, tokens_per_group)

  def route(self, x: jax.Array) -> tuple[routing_lib.Routing, jax.Array]:
    """x[G, S, M] -> (Routing, router logits [G, S, E] in router_dtype, f32 by default)."""
    deterministic = self.deterministic
    logits, noise_logits = self.router(x, deterministic=deterministic)
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

  def __call__(self, x: jax.Array) -> tuple[jax.Array, MoeOutput]:
    """x[B, L, M] -> (y[B, L, M] in `dtype`, MoeOutput)."""
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(
          f"MoeLayer expects tokens [B, L, M={self.d_model}], got shape {x.shape}.")
    groups = group_tokens(x, self.group_size)  # [G, S, M]
    # On a mesh: whole groups per device, routed where they are.
    groups = expert_parallel_lib.constrain_groups(groups)
    routing, logits = self.route(groups)
    groups = groups.astype(self.dtype)
    if self.dispatch == "dropless":
      y = dropless_lib.apply(groups, routing, self.experts,
                             deterministic=self.deterministic)
    elif expert_parallel_lib.uses_shard_map(self.expert_parallel):
      y = expert_parallel_lib.shard_map_experts(self, groups, routing)
    else:
      dispatch, combine = ((dispatch_einsum, combine_einsum)
                           if self.dispatch == "einsum"
                           else (dispatch_gather, combine_fast))
      if partitioning.current_mesh() is not None:
        # Group by group, so that XLA keeps the groups where they are.
        dispatch = functools.partial(
            expert_parallel_lib.per_group(dispatch), x_axis=0, out_axis=1)
        combine = functools.partial(
            expert_parallel_lib.per_group(combine), x_axis=1, out_axis=0)
      buffers = dispatch(groups, routing)
      # GSPMD: E over 'expert' for the experts (an all-to-all), and back.
      buffers = expert_parallel_lib.to_experts(buffers)
      outputs = self.experts(buffers, deterministic=self.deterministic)  # [E, G, C, M]
      outputs = expert_parallel_lib.from_experts(outputs)
      y = combine(outputs, routing)
    y = expert_parallel_lib.constrain_groups(y)
    aux = MoeOutput(aux_loss=routing.aux_loss,
                    z_loss=routing_lib.router_z_loss(logits.astype(jnp.float32)),
                    metrics=routing.metrics)
    return y.reshape(x.shape).astype(self.dtype), aux
