"""Routers: pure functions from router logits to a `Routing`.

Notation: see `switchjax/__init__.py`.

Every router takes logits `f32[G, S, E]` and returns a `Routing`, which keeps a
compact form: for each slot of each expert the token sitting in it
(`token_index i32[G, E, C]`, `S` for an empty slot) and its combine weight
(`slot_weight f32[G, E, C]`). Token-choice routers also keep the token-major
view (`expert_index`, `slot_index`, `token_weight`, each `[G, S, K]`) so the
fast combine is a gather rather than a scatter. The dense `[G, S, E, C]`
dispatch/combine tensors of GShard and flaxformer are built only on request.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class RouterMetrics:
  """What a researcher reads about a router, averaged over groups.

  dropped_fraction: f32[], tokens that reach no expert (residual only).
  expert_load: f32[E], fraction of the dispatched (token, expert) pairs per expert.
  router_confidence: f32[], mean over tokens of max_e p_e.
  router_entropy: f32[], mean over tokens of -sum_e p_e log p_e.
  """
  dropped_fraction: jax.Array
  expert_load: jax.Array
  router_confidence: jax.Array
  router_entropy: jax.Array


@flax.struct.dataclass
class Routing:
  """Where every token goes, in compact index form.

  token_index:  i32[G, E, C] token in slot c of expert e; S marks an empty slot.
  slot_weight:  f32[G, E, C] combine weight of that slot (0 when empty).
  aux_loss:     f32[] load-balancing loss, unscaled.
  metrics:      RouterMetrics.
  num_tokens:   S (static).
  expert_index: i32[G, S, K] or None, the k-th expert chosen by each token.
  slot_index:   i32[G, S, K] or None, flat slot `e * C + c` of that choice, or
                `E * C` when the choice was dropped (or never made).
  token_weight: f32[G, S, K] or None, combine weight of that choice (0 if dropped).
  """
  token_index: jax.Array
  slot_weight: jax.Array
  aux_loss: jax.Array
  metrics: RouterMetrics
  num_tokens: int = flax.struct.field(pytree_node=False)
  expert_index: Optional[jax.Array] = None
  slot_index: Optional[jax.Array] = None
  token_weight: Optional[jax.Array] = None

  @property
  def num_experts(self) -> int:
    return self.token_index.shape[1]

  @property
  def capacity(self) -> int:
    return self.token_index.shape[2]

  def dispatch_mask(self) -> jax.Array:
    """bool[G, S, E, C]: token s of group g sits in slot c of expert e."""
    # one_hot of the sentinel S is an all-zero row: empty slots dispatch nothing.
    onehot = jax.nn.one_hot(self.token_index, self.num_tokens, dtype=jnp.bool_)  # [G, E, C, S]
    return jnp.transpose(onehot, (0, 3, 1, 2))

  def combine_weights(self) -> jax.Array:
    """f32[G, S, E, C]: weight of each slot's expert output for each token."""
    mask = self.dispatch_mask()
    return mask.astype(self.slot_weight.dtype) * self.slot_weight[:, None, :, :]


# ---------------------------------------------------------------------------
# Capacity.


def expert_capacity(tokens_per_group: int, num_experts: int,
                    capacity_factor: float, num_selected: int = 1,
                    min_capacity: int = 4) -> int:
  """Slots per expert per group: max(min_capacity, ceil(K * cf * S / E)).

  How this differs from the references:
    * flaxformer: `max(min_capacity, round(cf * S / E))`, no K factor, so its
      top-2 layers at cf=1.0 hold half the choices; it also rounds to nearest.
    * GShard: `2S / E` for top-2, i.e. the K=2, cf=1.0 case of this formula.
  We take the ceiling (so cf=1.0 always fits a perfectly balanced routing) and
  count all K choices (so cf means the same thing for top-1 and top-2).
  """
  if tokens_per_group < 1 or num_experts < 1:
    raise ValueError(
        f"tokens_per_group ({tokens_per_group}) and num_experts "
        f"({num_experts}) must be >= 1")
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  if not 1 <= num_selected <= num_experts:
    raise ValueError(
        f"num_selected must be in [1, num_experts={num_experts}], got "
        f"{num_selected}")
  if min_capacity < 1:
    raise ValueError(f"min_capacity must be >= 1, got {min_capacity}")
  # round() first: 1.1 * 100 / 10 is 11.000000000000002 in floating point.
  slots = math.ceil(round(num_selected * capacity_factor * tokens_per_group
                          / num_experts, 9))
  return max(min_capacity, slots)


# ---------------------------------------------------------------------------
# Shared pieces.


def _check_logits(logits: jax.Array, capacity: int) -> None:
  if logits.ndim != 3:
    raise ValueError(
        f"router logits must be f32[G, S, E], got shape {logits.shape}")
  if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
    raise ValueError(f"capacity must be a Python int, got {capacity!r}")
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}")


def _check_num_selected(num_selected: int, num_experts: int) -> None:
  if not 1 <= num_selected <= num_experts:
    raise ValueError(
        f"num_selected (k={num_selected}) must be in [1, num_experts="
        f"{num_experts}]")


def _positions_in_expert(expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """Rank of each entry among the entries for the same expert, in entry order.

  A stable sort by expert id, not a [G, N, E] one-hot cumsum: O(N log N)
  memory-light work per group instead of O(N * E).

  Args:
    expert_ids: i32[G, N] expert of each entry; `num_experts` marks "none".

  Returns:
    i32[G, N] position of each entry in its expert's queue.
  """
  n = expert_ids.shape[-1]
  order = jnp.argsort(expert_ids, axis=-1, stable=True)
  sorted_ids = jnp.take_along_axis(expert_ids, order, axis=-1)
  counts = jax.vmap(lambda e: jnp.bincount(e, length=num_experts + 1))(
      expert_ids)  # [G, E + 1]
  starts = jnp.cumsum(counts, axis=-1) - counts
  pos_sorted = jnp.arange(n) - jnp.take_along_axis(starts, sorted_ids, axis=-1)
  # Undo the sort: entry order[i] has position pos_sorted[i].
  return jax.vmap(lambda o, p: jnp.zeros_like(p).at[o].set(p))(
      order, pos_sorted)


def switch_aux_loss(probs: jax.Array, chosen: jax.Array) -> jax.Array:
  """E * sum_e f_e * P_e, averaged over groups (Switch eq. 4-6).

  Args:
    probs: f32[G, S, E] router probabilities.
    chosen: i32[G, S, K] the choices that count for f_e (before any dropping);
      f_e is the fraction of all S*K choices that picked e.
  """
  num_experts = probs.shape[-1]
  counts = jax.vmap(lambda e: jnp.bincount(e.reshape(-1), length=num_experts))(
      chosen)  # [G, E]
  f = counts / (chosen.shape[1] * chosen.shape[2])
  p = jnp.mean(probs, axis=1)
  return jnp.mean(num_experts * jnp.sum(f * p, axis=-1))


def _prob_stats(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  confidence = jnp.mean(jnp.max(probs, axis=-1))
  entropy = jnp.mean(-jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1))
  return confidence, entropy


def _metrics(probs: jax.Array, token_index: jax.Array) -> RouterMetrics:
  """Metrics from the slot-major assignment i32[G, E, C]."""
  g, s, e = probs.shape
  filled = token_index < s  # [G, E, C]
  per_expert = jnp.sum(filled, axis=(0, 2)).astype(jnp.float32)
  hits = jax.vmap(lambda t: jnp.bincount(t.reshape(-1), length=s + 1))(
      token_index)[:, :s]  # [G, S] experts each token reached
  confidence, entropy = _prob_stats(probs)
  return RouterMetrics(
      dropped_fraction=jnp.mean((hits == 0).astype(jnp.float32)),
      expert_load=per_expert / jnp.maximum(jnp.sum(per_expert), 1.0),
      router_confidence=confidence,
      router_entropy=entropy)


def token_choice_routing(probs: jax.Array, expert_index: jax.Array,
                         weights: jax.Array, valid: jax.Array, capacity: int,
                         aux_loss: jax.Array,
                         priority: Optional[jax.Array] = None) -> Routing:
  """Gives slots to token choices, first choices before second choices.

  Args:
    probs: f32[G, S, E].
    expert_index: i32[G, S, K] the k-th expert of each token.
    weights: f32[G, S, K] combine weight of each choice before dropping.
    valid: bool[G, S, K] whether the choice is made at all (GShard's random
      policy drops some second choices before capacity is applied).
    capacity: C.
    aux_loss: f32[] already computed by the caller.
    priority: f32[G, S] or None. None: tokens claim slots in token order.
      Otherwise in descending priority (batch-prioritized routing).
  """
  g, s, k = expert_index.shape
  e = probs.shape[-1]
  ids = jnp.where(valid, expert_index, e)  # e = "no expert"
  if priority is not None:
    perm = jnp.argsort(-priority, axis=-1, stable=True)  # [G, S]
    ids = jnp.take_along_axis(ids, perm[..., None], axis=1)
  # k-major order: all first choices claim slots before any second choice.
  flat = jnp.swapaxes(ids, 1, 2).reshape(g, k * s)
  pos = jnp.swapaxes(_positions_in_expert(flat, e).reshape(g, k, s), 1, 2)
  if priority is not None:
    pos = jax.vmap(lambda p, q: jnp.zeros_like(q).at[p].set(q))(perm, pos)

  kept = valid & (pos < capacity)
  slot_index = jnp.where(kept, expert_index * capacity + pos, e * capacity)
  token_weight = jnp.where(kept, weights, 0.0)

  # Slot-major view: scatter entry ids (ints, no gradient) into the slots,
  # then gather the weights so gradients reach the router through a gather.
  entry = (jnp.arange(k)[None, :] * s + jnp.arange(s)[:, None])  # [S, K]
  entry = jnp.broadcast_to(entry, (g, s, k))
  slot_entry = jax.vmap(
      lambda si, en: jnp.full((e * capacity + 1,), k * s, jnp.int32)
      .at[si.reshape(-1)].set(en.reshape(-1)))(slot_index, entry)
  slot_entry = slot_entry[:, :e * capacity]  # drop the dump slot
  token_index = jnp.where(slot_entry < k * s, slot_entry % s, s)
  weight_by_entry = jnp.concatenate(
      [jnp.swapaxes(token_weight, 1, 2).reshape(g, k * s),
       jnp.zeros((g, 1), token_weight.dtype)], axis=1)
  slot_weight = jnp.take_along_axis(weight_by_entry, slot_entry, axis=1)

  token_index = token_index.reshape(g, e, capacity).astype(jnp.int32)
  return Routing(
      token_index=token_index,
      slot_weight=slot_weight.reshape(g, e, capacity),
      aux_loss=aux_loss,
      metrics=_metrics(probs, token_index),
      num_tokens=s,
      expert_index=expert_index.astype(jnp.int32),
      slot_index=slot_index.astype(jnp.int32),
      token_weight=token_weight)


# ---------------------------------------------------------------------------
# Routers.


def switch_top1(logits: jax.Array, capacity: int, *,
                batch_prioritized: bool = False) -> Routing:
  """Switch Transformer top-1 routing (Fedus et al. 2021).

  Each token picks argmax_e p_e (ties to the lower index) with combine weight
  p_e, the softmax probability, so the router gets gradients. Tokens claim
  slots of their expert in token order (or, batch-prioritized, in descending
  order of p_e); a token past the capacity is dropped.

  Args:
    logits: f32[G, S, E].
    capacity: C, slots per expert per group.
    batch_prioritized: V-MoE batch-prioritized routing (not causal).
  """
  _check_logits(logits, capacity)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  expert = jnp.argmax(probs, axis=-1)[..., None]  # [G, S, 1]
  weight = jnp.take_along_axis(probs, expert, axis=-1)
  return token_choice_routing(
      probs, expert, weight, jnp.ones_like(expert, bool), capacity,
      aux_loss=switch_aux_loss(probs, expert),
      priority=weight[..., 0] if batch_prioritized else None)


def gshard_top2(logits: jax.Array, capacity: int,
                second_expert_policy: str = "all",
                rng: Optional[jax.Array] = None) -> Routing:
  """GShard top-2 routing (Lepikhin et al. 2020, Algorithm 1).

  e1 = argmax p, e2 = argmax of the rest; g1 = p1 / (p1 + p2), g2 = p2 /
  (p1 + p2), normalised before any dropping. First choices of all tokens
  claim slots (token order), then second choices take what is left.
  Policy "random" keeps a second choice only if 2 * g2 > u, u ~ U(0, 1).
  aux_loss is Switch's with f_e from first choices only.
  """
  _check_logits(logits, capacity)
  num_experts = logits.shape[-1]
  if num_experts < 2:
    raise ValueError(f"gshard_top2 needs at least 2 experts, got {num_experts}")
  if second_expert_policy not in ("all", "random"):
    raise ValueError(
        "second_expert_policy must be 'all' or 'random', got "
        f"{second_expert_policy!r}")
  if second_expert_policy == "random" and rng is None:
    raise ValueError("second_expert_policy='random' needs an rng")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  e1 = jnp.argmax(probs, axis=-1)
  p1 = jnp.take_along_axis(probs, e1[..., None], axis=-1)[..., 0]
  rest = jnp.where(jnp.arange(num_experts) == e1[..., None], -1.0, probs)
  e2 = jnp.argmax(rest, axis=-1)
  p2 = jnp.take_along_axis(probs, e2[..., None], axis=-1)[..., 0]
  g1, g2 = p1 / (p1 + p2), p2 / (p1 + p2)
  keep2 = jnp.ones_like(g2, bool)
  if second_expert_policy == "random":
    keep2 = 2.0 * g2 > jax.random.uniform(rng, g2.shape)
  expert = jnp.stack([e1, e2], axis=-1)
  valid = jnp.stack([jnp.ones_like(keep2), keep2], axis=-1)
  return token_choice_routing(
      probs, expert, jnp.stack([g1, g2], axis=-1), valid, capacity,
      aux_loss=switch_aux_loss(probs, e1[..., None]))


def topk(logits: jax.Array, capacity: int, num_selected: int, *,
         normalize_weights: bool = True,
         batch_prioritized: bool = False) -> Routing:
  """General top-k token choice (Mixtral-style when normalised).

  Each token picks its K most probable experts (ties to the lower index).
  Weights are the probabilities, renormalised over the K choices when
  `normalize_weights`. Choice k of every token claims slots before choice k+1
  of any token. aux_loss is Switch's with f_e over all S*K choices (equal to
  1.0 under uniform routing for any K).
  """
  _check_logits(logits, capacity)
  _check_num_selected(num_selected, logits.shape[-1])
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weight, expert = jax.lax.top_k(probs, num_selected)
  if normalize_weights:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  return token_choice_routing(
      probs, expert, weight, jnp.ones_like(expert, bool), capacity,
      aux_loss=switch_aux_loss(probs, expert),
      priority=weight[..., 0] if batch_prioritized else None)


def _cv_squared(x: jax.Array) -> jax.Array:
  """Squared coefficient of variation over the last axis, mean over the rest."""
  return jnp.mean(jnp.var(x, axis=-1) / (jnp.mean(x, axis=-1) ** 2 + 1e-10))


def noisy_topk(logits: jax.Array, noise_logits: jax.Array, capacity: int,
               num_selected: int, *, rng: Optional[jax.Array] = None
               ) -> Routing:
  """Noisy top-k gating (Shazeer et al. 2017).

  H = logits + N(0, 1) * softplus(noise_logits) (no noise when rng is None,
  e.g. at eval); gates = softmax over the K largest H. aux_loss =
  CV(importance)^2 + CV(load)^2 (eqs. 6-10), with importance_e the sum of
  the gates of e and load_e the sum over tokens of the probability, under
  fresh noise, that e is among the token's top K.

  Args:
    logits: f32[G, S, E] clean logits x W_g.
    noise_logits: f32[G, S, E] x W_noise.
  """
  _check_logits(logits, capacity)
  num_experts = logits.shape[-1]
  _check_num_selected(num_selected, num_experts)
  logits = logits.astype(jnp.float32)
  noise_std = jax.nn.softplus(noise_logits.astype(jnp.float32)) + 1e-2
  noisy = logits
  if rng is not None:
    noisy = logits + jax.random.normal(rng, logits.shape) * noise_std
  k = num_selected
  top_vals, expert = jax.lax.top_k(noisy, min(k + 1, num_experts))
  weight = jax.nn.softmax(top_vals[..., :k], axis=-1)
  expert = expert[..., :k]
  gates = jnp.sum(jax.nn.one_hot(expert, num_experts) * weight[..., None],
                  axis=-2)  # [G, S, E]
  importance = jnp.sum(gates, axis=1)  # [G, E]
  if k < num_experts:
    # P(expert e in the top k) = Phi((clean_e - threshold_e) / std_e), with
    # threshold the k-th largest of the *other* noisy values (eq. 9).
    in_top = jnp.any(jnp.arange(num_experts) == expert[..., None], axis=-2)
    threshold = jnp.where(in_top, top_vals[..., k:k + 1],
                          top_vals[..., k - 1:k])
    p_in = jax.scipy.stats.norm.cdf((logits - threshold) / noise_std)
  else:
    p_in = jnp.ones_like(logits)
  load = jnp.sum(p_in, axis=1)  # [G, E]
  aux = _cv_squared(importance) + _cv_squared(load)
  probs = jax.nn.softmax(logits, axis=-1)
  return token_choice_routing(
      probs, expert, weight, jnp.ones_like(expert, bool), capacity,
      aux_loss=aux)


def expert_choice(logits: jax.Array, capacity: int) -> Routing:
  """Expert-choice routing (Zhou et al. 2022).

  Each expert takes the `capacity` tokens of its group with the highest
  probability for it (ties to the lower token index); combine weight = that
  probability. A token may be taken by 0..E experts. No aux loss. Not
  causal: a token's routing depends on later tokens, so encoders only.
  Capacities above S leave the extra slots empty.
  """
  _check_logits(logits, capacity)
  g, s, e = logits.shape
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  taken = min(capacity, s)
  weight, token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), taken)  # [G, E, C']
  pad = capacity - taken
  token_index = jnp.pad(token, ((0, 0), (0, 0), (0, pad)), constant_values=s)
  slot_weight = jnp.pad(weight, ((0, 0), (0, 0), (0, pad)))
  token_index = token_index.astype(jnp.int32)
  return Routing(
      token_index=token_index,
      slot_weight=slot_weight,
      aux_loss=jnp.zeros((), jnp.float32),
      metrics=_metrics(probs, token_index),
      num_tokens=s)


def hash_top1(expert_index: jax.Array, num_experts: int,
              capacity: int) -> Routing:
  """Hash layers (Roller et al. 2021): every token to its id's expert.

  expert_index: i32[G, S] (`hash_router.HashRouter`). Combine weight 1;
  tokens past an expert's capacity are dropped in token order, as Switch's.
  There is no router to balance: aux_loss is 0; the metrics see one-hot
  probabilities (confidence 1, entropy 0).
  """
  probs = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
  ones = jnp.ones(expert_index.shape + (1,), jnp.float32)
  return token_choice_routing(probs, expert_index[..., None], ones,
                               ones > 0, capacity, jnp.zeros((), jnp.float32))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_tokens logsumexp^2."""
  if logits.ndim != 3:
    raise ValueError(
        f"router logits must be f32[G, S, E], got shape {logits.shape}")
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(lse ** 2)


# "soft" has no token routing: switchjax/soft_moe.py mixes tokens into slots.
# "hash" routes by token id (switchjax/hash_router.py, then `hash_top1`).
# "loss_free" adds a balancing bias to the scores it ranks by
# (switchjax/loss_free.py: the bias lives in the train state).
ROUTERS = ("switch", "gshard", "expert_choice", "topk", "noisy_topk", "soft",
           "hash", "loss_free")
SECOND_EXPERT_POLICIES = ("all", "random")
# Experts each token is sent to, for routers whose K is fixed by the algorithm
# (expert choice: 1, there the capacity factor is the mean experts per token).
FIXED_K = {"switch": 1, "gshard": 2, "expert_choice": 1, "soft": 1, "hash": 1}
# Routers in which later tokens of a group decide what earlier ones get (each
# expert picks its tokens from the whole group): they would let a decoder see
# future tokens. Batch-prioritized routing (any router) is the same.
NON_CAUSAL_ROUTERS = ("expert_choice", "soft")


def experts_per_token(router: str, num_selected: int) -> int:
  """K of `router`: fixed by the algorithm, else `num_selected` (topk, noisy_topk)."""
  return FIXED_K.get(router, num_selected)


def is_causal(router: str, batch_prioritized: bool = False) -> bool:
  """Whether a token's routing depends only on itself and earlier tokens."""
  return router not in NON_CAUSAL_ROUTERS and not batch_prioritized


def route(router: str, logits: jax.Array, capacity: int, *,
          num_selected: int = 1, rng: Optional[jax.Array] = None,
          noise_logits: Optional[jax.Array] = None,
          second_expert_policy: str = "all", normalize_weights: bool = True,
          batch_prioritized: bool = False) -> Routing:
  """Calls the router named in the config (`moe.router`)."""
  if router == "switch":
    return switch_top1(logits, capacity, batch_prioritized=batch_prioritized)
  if router == "gshard":
    return gshard_top2(logits, capacity, second_expert_policy, rng)
  if router == "expert_choice":
    return expert_choice(logits, capacity)
  if router == "topk":
    return topk(logits, capacity, num_selected,
                normalize_weights=normalize_weights,
                batch_prioritized=batch_prioritized)
  if router == "noisy_topk":
    if noise_logits is None:
      raise ValueError("router 'noisy_topk' needs noise_logits")
    return noisy_topk(logits, noise_logits, capacity, num_selected, rng=rng)
  if router == "soft":
    raise ValueError("router 'soft' routes no tokens: it is "
                     "switchjax.soft_moe.SoftMoeLayer's slots")
  if router == "hash":
    raise ValueError("router 'hash' routes token ids, not logits: hash_top1")
  if router == "loss_free":
    raise ValueError("router 'loss_free' also needs its balancing bias: "
                     "switchjax.loss_free.topk")
  raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
