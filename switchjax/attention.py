"""Attention: T5's relative position buckets, rotary embeddings, masks, heads.

Notation: see `switchjax/__init__.py` (Q query length, T key length, N
heads, D head dim, J key/value heads). Attention has no biases
and no 1/sqrt(D) scaling of the logits: as in T5, the scaling is folded
into the query initialisation instead (a converted Mistral/Mixtral query
weight is multiplied by D^-0.5, see `switchjax.mixtral_layout`).

Positions come in two kinds (`model.position_embedding`): T5's learned
relative bias added to the logits (`RelativePositionBias`), or rotary
embeddings applied to queries and keys (`rope`, Su et al. 2021, as Llama,
Mistral and Mixtral). Grouped-query attention (`num_kv_heads` < num_heads,
Ainslie et al. 2023) shares each key/value head among N / J query
heads; sliding-window attention (`window_mask`) limits how far back a query
sees.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

# Added to masked logits; finite so a fully masked row (a padding query)
# gives a uniform softmax rather than NaN.
_MASK_VALUE = -1e10
# Std of a standard normal truncated to [-2, 2]; dividing by it makes the
# truncated draw have the requested std (as jax's variance_scaling does).
_TRUNC_STD = 0.87962566103423978


def truncated_normal_init(std: float) -> jax.nn.initializers.Initializer:
  """Truncated normal in [-2 std, 2 std] whose actual std is `std`."""
  return jax.nn.initializers.truncated_normal(stddev=std / _TRUNC_STD)


def make_param(init, rngs: nnx.Rngs, shape, names) -> nnx.Param:
  """An f32 parameter tagged with logical axis names (`out_sharding`).

  The names are not applied at creation (eager_sharding=False): the
  partitioning code maps them to mesh axes with logical axis rules.
  """
  return nnx.Param(init(rngs.params(), shape, jnp.float32),
                   out_sharding=names, eager_sharding=False)


def dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """nnx.Dropout drawing from a fork of the 'dropout' stream when rate > 0."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
  return nnx.Dropout(rate, rngs=rngs["dropout"].fork() if rate > 0 else None)


def relative_position_bucket(relative_position: jax.Array, *,
                             bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> jax.Array:
  """T5's `_relative_position_bucket` (Raffel et al. 2020, mesh_tensorflow).

  relative_position = key position - query position, i32[...]. Half of the
  buckets (of each direction if bidirectional) hold exact offsets 0..n-1, the
  rest grow logarithmically up to max_distance; farther offsets share the
  last bucket. Unidirectional (causal) attention maps every future offset
  (key after query) to bucket 0.
  Returns i32[...] in [0, num_buckets).
  """
  ret = jnp.zeros_like(relative_position, dtype=jnp.int32)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps)
      / math.log(max_distance / max_exact)
      * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nnx.Module):
  """A learned scalar per (bucket, head), added to the attention logits.

  T5 keeps one table per stack and shares it across the stack's layers.
  """

  def __init__(self, num_buckets: int, num_heads: int, max_distance: int, *,
               bidirectional: bool, init_scale: float = 1.0,
               rngs: nnx.Rngs):
    self.num_buckets = num_buckets
    self.max_distance = max_distance
    self.bidirectional = bidirectional
    # T5X: variance_scaling(1.0, 'fan_avg', 'uniform'), here times init_scale.
    init = jax.nn.initializers.variance_scaling(init_scale, "fan_avg", "uniform")
    self.embedding = make_param(init, rngs, (num_buckets, num_heads),
                                ("relpos_buckets", "heads"))

  def __call__(self, query_positions: jax.Array,
               key_positions: jax.Array) -> jax.Array:
    """i32[B, Q], i32[B, T] (B may be 1) -> f32[B, N, Q, T]."""
    rel = key_positions[:, None, :] - query_positions[:, :, None]  # [B, Q, T]
    buckets = relative_position_bucket(
        rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
        max_distance=self.max_distance)
    bias = jnp.take(self.embedding[...], buckets, axis=0)  # [B, Q, T, N]
    return jnp.transpose(bias, (0, 3, 1, 2))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of x [B, L, N, D] at positions i32[B|1, L].

  The rotate-half layout of GPT-NeoX, Llama and Mistral: dims d and
  d + D/2 form a pair rotated by the angle p * theta^(-2d/D). A query at p
  and a key at p' then meet through a rotation by p - p' only. Computed in
  float32, returned in x's dtype.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary embeddings need an even head dim, got {d}")
  inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def window_mask(positions: jax.Array, key_positions: jax.Array, window: int,
                *, causal: bool) -> jax.Array:
  """Sliding-window attention (Mistral): bool[B|1, 1, Q, T] from positions
  i32[B|1, Q] and key positions i32[B|1, T].

  A query at p sees keys at p - window < p' (and, in a bidirectional stack,
  p' < p + window): `window` positions counting its own. The causal part
  stays `make_attention_mask`'s.
  """
  offset = positions[:, :, None] - key_positions[:, None, :]  # [B, Q, T]
  inside = offset < window
  if not causal:
    inside &= offset > -window
  return inside[:, None]


def make_attention_mask(query_valid: jax.Array, key_valid: jax.Array, *,
                        causal: bool = False,
                        query_segment_ids: Optional[jax.Array] = None,
                        key_segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Which keys each query may attend to.

  query_valid: bool[B, Q], key_valid: bool[B, T] (False = padding).
  causal: query i sees keys j <= i (by index, as T5X; within a packed
    segment index order is position order, and segment ids cut the rest).
  *_segment_ids: i32[B, Q] / i32[B, T]; queries see keys of their own segment.
  Returns bool[B, 1, Q, T].
  """
  mask = query_valid[:, :, None] & key_valid[:, None, :]
  if causal:
    q_idx = jnp.arange(query_valid.shape[1])
    k_idx = jnp.arange(key_valid.shape[1])
    mask &= (k_idx[None, :] <= q_idx[:, None])[None]
  if query_segment_ids is not None and key_segment_ids is not None:
    mask &= query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
  return mask[:, None]


class MultiHeadAttention(nnx.Module):
  """Multi-head dot-product attention: no biases, no logit scaling (T5).

  Params (f32): query [M, N, D], key/value [M, J, D] (J = num_kv_heads,
  default N), out [N, D, M]. Inits are truncated normal with std
  sqrt(init_scale / fan_in), the query's further scaled by D^-0.5 (T5's
  folded 1/sqrt(D)): std sqrt(init_scale / (M * D)). `rope_theta` > 0
  rotates queries and keys by their positions (`rope`); query head h reads
  key/value head h // (N / J) (Hugging Face's `repeat_kv` order).
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               num_kv_heads: int = 0, rope_theta: float = 0.0,
               dropout_rate: float = 0.0, init_scale: float = 1.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of "
                       f"num_kv_heads={num_kv_heads}")
    self.dtype = dtype
    self.rope_theta = rope_theta
    self.kv_repeats = num_heads // num_kv_heads
    in_names = ("embed", "heads", "kv")
    self.query = make_param(
        truncated_normal_init(math.sqrt(init_scale / (d_model * head_dim))),
        rngs, (d_model, num_heads, head_dim), in_names)
    kv_init = truncated_normal_init(math.sqrt(init_scale / d_model))
    kv_shape = (d_model, num_kv_heads, head_dim)
    self.key = make_param(kv_init, rngs, kv_shape, in_names)
    self.value = make_param(kv_init, rngs, kv_shape, in_names)
    self.out = make_param(
        truncated_normal_init(math.sqrt(init_scale / (num_heads * head_dim))),
        rngs, (num_heads, head_dim, d_model), ("heads", "kv", "embed"))
    self.dropout = dropout(dropout_rate, rngs)
    # Decoding caches (`init_cache`, `cache_inputs`); None in training, and
    # then not part of the model's state.
    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)

  def _key_value(self, inputs_kv: jax.Array,
                 positions: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, jax.Array]:
    """[B, T, M] -> keys, values [B, T, J, D] in `dtype`; keys rotated by
    `positions` i32[B|1, T] when the layer uses rotary embeddings."""
    dt = self.dtype
    xkv = inputs_kv.astype(dt)
    k = jnp.einsum("BTM,MJD->BTJD", xkv, self.key[...].astype(dt))
    if self.rope_theta and positions is not None:
      k = rope(k, positions, self.rope_theta)
    return k, jnp.einsum("BTM,MJD->BTJD", xkv, self.value[...].astype(dt))

  def init_cache(self, batch: int, length: int) -> None:
    """Self-attention decoding: room for `length` keys and values per row.

    Each call then writes its Q new keys/values at `cache_index` (shared by
    the rows), advances it by Q and attends over all `length` cached entries
    (the caller's mask hides those not yet written).
    """
    _, n, d = self.key.shape
    zeros = jnp.zeros((batch, length, n, d), self.dtype)
    self.cached_key = nnx.Cache(zeros)
    self.cached_value = nnx.Cache(zeros)
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def cache_inputs(self, inputs_kv: jax.Array) -> None:
    """Cross-attention decoding: project fixed inputs [B, T, M] (the encoder's
    output) once; calls then attend over them and ignore `inputs_kv`."""
    k, v = self._key_value(inputs_kv)
    self.cached_key = nnx.Cache(k)
    self.cached_value = nnx.Cache(v)
    self.cache_index = None

  def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array], *,
               mask: Optional[jax.Array] = None,
               bias: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """Attention of inputs_q [B, Q, M] over inputs_kv [B, T, M].

    mask: bool[B, 1|N, Q, T], False = may not attend.
    bias: f32[B|1, N, Q, T] added to the logits (relative positions).
    positions: i32[B|1, Q] of the queries, for rotary embeddings; in
      self-attention the new keys share them (cached keys keep theirs).
    With a cache, T is the cache's length (see `init_cache`, `cache_inputs`).
    Returns [B, Q, M] in `dtype`.
    """
    dt = self.dtype
    q = jnp.einsum("BQM,MND->BQND", inputs_q.astype(dt),
                   self.query[...].astype(dt))
    if self.rope_theta and positions is not None:
      q = rope(q, positions, self.rope_theta)
    if self.cached_key is None:
      k, v = self._key_value(inputs_kv, positions)
    elif self.cache_index is None:
      k, v = self.cached_key[...], self.cached_value[...]
    else:
      new_k, new_v = self._key_value(inputs_kv, positions)
      at = (0, self.cache_index[...], 0, 0)
      k = jax.lax.dynamic_update_slice(self.cached_key[...], new_k, at)
      v = jax.lax.dynamic_update_slice(self.cached_value[...], new_v, at)
      self.cached_key[...], self.cached_value[...] = k, v
      self.cache_index[...] += q.shape[1]
    if self.kv_repeats > 1:  # grouped-query: head h reads kv head h // (N / J)
      k = jnp.repeat(k, self.kv_repeats, axis=2)
      v = jnp.repeat(v, self.kv_repeats, axis=2)
    # Logits and softmax in f32: bf16 logits lose the small bias differences.
    logits = jnp.einsum("BQND,BTND->BNQT", q, k,
                        preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    probs = self.dropout(probs)
    ctx = jnp.einsum("BNQT,BTND->BQND", probs, v)
    return jnp.einsum("BQND,NDM->BQM", ctx, self.out[...].astype(dt))
