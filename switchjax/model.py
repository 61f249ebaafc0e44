"""T5.1.1-style Transformer (encoder-decoder or decoder-only) with sparse FFNs.

Notation: see `switchjax/__init__.py` (Li, Lt: encoder and decoder lengths).
Pre-norm layers (T5's RMS LayerNorm: scale only), relative position
biases shared across a stack's layers, dropout on the embeddings, after every
sublayer and after the final norm. The same layers make Mistral/Mixtral-style
blocks from config values alone: rotary positions instead of the bias
(`model.position_embedding='rope'`, `model.rope_theta`), grouped-query
attention (`model.num_kv_heads`), sliding-window attention
(`model.attention_window`), SwiGLU FFNs and experts
(`model.activation='swiglu'`) and the norm's epsilon (`model.norm_epsilon`);
experiments/mixtral.py. Layer i (0-based) of a stack has an MoE
FFN iff moe.num_experts > 0 and i % sparse_every == sparse_every - 1, so
Switch's sparse_every=2 makes layers 1, 3, 5, ... sparse; moe.sparse_offset
moves which layer of every sparse_every is sparse (Hugging Face's layout),
and moe.first_dense_layers keeps the first layers dense (DeepSeekMoE).

Params are float32; activations and matmuls run in model.dtype and the
logits come out in float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from switchjax import attention
from switchjax import experts as experts_lib
from switchjax import moe as moe_lib
from switchjax import partitioning
from switchjax import routing as routing_lib
from switchjax import shared_experts
from switchjax import soft_moe

ARCHS = ("encoder_decoder", "decoder_only")
POSITION_EMBEDDINGS = ("relative", "rope")
REMATS = ("none", "full", "experts")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@flax.struct.dataclass
class ModelAux:
  """Side outputs of a forward pass, summarised over the MoE layers.

  aux_loss: f32[] mean over MoE layers of the unscaled load-balancing losses
    (0 for a dense model).
  z_loss: f32[] mean over MoE layers of the unscaled router z-losses.
  metrics: RouterMetrics with a leading axis over the model's MoE layers
    (dropped_fraction f32[layers], expert_load f32[layers, E],
    router_confidence f32[layers], router_entropy f32[layers]); None for a
    dense model.
  layer_names: static names of those layers, e.g. 'encoder/layer_1'.
  """
  aux_loss: jax.Array
  z_loss: jax.Array
  metrics: Optional[routing_lib.RouterMetrics]
  layer_names: tuple[str, ...] = flax.struct.field(pytree_node=False,
                                                   default=())


def to_dtype(name: str) -> Any:
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; expected one of {tuple(DTYPES)}.")
  return DTYPES[name]


def is_sparse_layer(index: int, num_experts: int, sparse_every: int,
                    sparse_offset: int = -1, first_dense: int = 0) -> bool:
  """Whether layer `index` (0-based) of a stack gets an MoE FFN.

  Layer i is sparse iff i >= first_dense and i % sparse_every ==
  sparse_offset; offset -1 means sparse_every - 1 (the last layer of every
  sparse_every).
  """
  offset = sparse_every - 1 if sparse_offset < 0 else sparse_offset
  return (num_experts > 0 and index >= first_dense
          and index % sparse_every == offset)


def sparse_layers(moe_config: ml_collections.ConfigDict,
                  num_layers: int) -> list[bool]:
  """Per layer of a stack of `num_layers`: whether it gets an MoE FFN."""
  e = moe_config
  return [is_sparse_layer(i, e.num_experts, e.sparse_every, e.sparse_offset,
                          e.first_dense_layers)
          for i in range(num_layers)]


def expert_d_ff(config: ml_collections.ConfigDict) -> int:
  """H of each expert: moe.d_ff (default model.d_ff) / moe.expert_granularity."""
  d_ff = config.moe.d_ff if config.moe.d_ff > 0 else config.model.d_ff
  return d_ff // config.moe.expert_granularity


def routed_shape(moe_config: ml_collections.ConfigDict,
                 router: str) -> tuple[int, int]:
  """(E, K) of a layer's routed experts: moe.num_experts and the router's K,
  times moe.expert_granularity m; the always-on shared experts count
  against the m x K chosen (DeepSeekMoE keeps the compute of top-K)."""
  e = moe_config
  m = e.expert_granularity
  k = routing_lib.experts_per_token(router, e.num_selected)
  return m * e.num_experts, m * k - e.num_shared_experts


def stack_router(moe_config: ml_collections.ConfigDict, stack: str) -> str:
  """The router of the 'encoder' or 'decoder' stack (decoder_only uses 'decoder')."""
  return moe_config.get(f"{stack}_router") or moe_config.router


def causal_error(router: str, batch_prioritized: bool) -> str:
  """Why `router` (or batch-prioritized routing) cannot run in a decoder."""
  how = ("each slot mixes every token of the group" if router == "soft" else
         "each expert picks its tokens from the whole group")
  what = ("moe.batch_prioritized (slots claimed in order of gate value)"
          if batch_prioritized else f"router {router!r} ({how})")
  return (f"{what} lets later tokens decide what earlier ones get: future "
          "tokens leak in a decoder; use it in the encoder only "
          "(moe.encoder_router)")


def moe_layer_kwargs(config: ml_collections.ConfigDict, stack: str) -> dict:
  """Config -> MoeLayer keyword arguments for the given stack."""
  m, e = config.model, config.moe
  router = stack_router(e, stack)
  if stack == "decoder" and not routing_lib.is_causal(router, e.batch_prioritized):
    raise ValueError(causal_error(router, e.batch_prioritized))
  if router == soft_moe.ROUTER:
    return dict(
        num_experts=e.num_experts, slots_per_expert=e.slots_per_expert,
        group_size=e.group_size, normalize=e.soft_normalize,
        activation=m.activation, expert_dropout=e.expert_dropout,
        router_dtype=to_dtype(e.router_dtype),
        router_init_std=e.router_init_std, expert_parallel=e.expert_parallel,
        expert_impl=e.expert_impl, init_scale=m.init_scale,
        dtype=to_dtype(m.dtype))
  num_experts, num_selected = routed_shape(e, router)
  extra = ({"num_shared_experts": e.num_shared_experts}
           if e.num_shared_experts else {})
  return dict(
      num_experts=num_experts, router=router, num_selected=num_selected,
      train_capacity_factor=e.train_capacity_factor,
      eval_capacity_factor=e.eval_capacity_factor,
      min_capacity=e.min_capacity, group_size=e.group_size,
      expert_capacity=e.expert_capacity,
      activation=m.activation, expert_dropout=e.expert_dropout,
      router_jitter=e.router_jitter, router_dtype=to_dtype(e.router_dtype),
      router_init_std=e.router_init_std,
      second_expert_policy=e.second_expert_policy,
      normalize_weights=e.normalize_weights,
      batch_prioritized=e.batch_prioritized, dispatch=e.dispatch,
      expert_parallel=e.expert_parallel, expert_impl=e.expert_impl,
      init_scale=m.init_scale, dtype=to_dtype(m.dtype),
      vocab_size=m.vocab_size, score_func=e.score_func,
      routed_scaling_factor=e.routed_scaling_factor, **extra)


def rms_norm(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """The pre-sublayer and final norm: RMS, scale only (T5, Mixtral)."""
  m = config.model
  return nnx.RMSNorm(m.d_model, epsilon=m.norm_epsilon, dtype=to_dtype(m.dtype),
                     scale_metadata={"out_sharding": ("embed",),
                                     "eager_sharding": False},
                     rngs=rngs)


def _remat_call(module: nnx.Module, *args):
  """module(*args), its activations recomputed in the backward pass."""
  return nnx.remat(lambda mod, *a: mod(*a))(module, *args)


class TransformerLayer(nnx.Module):
  """Pre-norm self-attention, optional cross-attention, then a dense or MoE FFN."""

  def __init__(self, config: ml_collections.ConfigDict, *, cross_attention: bool,
               moe_kwargs: Optional[dict], rngs: nnx.Rngs):
    m = config.model
    dtype = to_dtype(m.dtype)

    def attn(rope_theta: float = 0.0):
      return attention.MultiHeadAttention(
          m.d_model, m.num_heads, m.head_dim, num_kv_heads=m.num_kv_heads,
          rope_theta=rope_theta, dropout_rate=m.dropout_rate,
          init_scale=m.init_scale, dtype=dtype, rngs=rngs)

    self.pre_self_attention_norm = rms_norm(config, rngs)
    # Rotary positions rotate self-attention only: cross-attention keys are
    # the encoder's outputs, positioned by the encoder itself.
    self.self_attention = attn(
        m.rope_theta if m.position_embedding == "rope" else 0.0)
    self.pre_cross_attention_norm = (rms_norm(config, rngs) if cross_attention
                                     else None)
    self.cross_attention = attn() if cross_attention else None
    self.pre_mlp_norm = rms_norm(config, rngs)
    self.sparse = moe_kwargs is not None
    if self.sparse:
      # moe_layer_kwargs gives router 'soft' a SoftMoeLayer's arguments, and
      # shared experts a SharedExpertsMoeLayer's.
      cls = (soft_moe.SoftMoeLayer if "slots_per_expert" in moe_kwargs
             else shared_experts.SharedExpertsMoeLayer
             if "num_shared_experts" in moe_kwargs else moe_lib.MoeLayer)
      self.mlp = cls(m.d_model, expert_d_ff(config), rngs=rngs, **moe_kwargs)
    else:
      self.mlp = experts_lib.MlpBlock(
          m.d_model, m.d_ff, activation=m.activation, dropout=m.dropout_rate,
          init_scale=m.init_scale, dtype=dtype, rngs=rngs)
    self.remat_mlp = self.sparse and m.remat == "experts"
    self.dropout = attention.dropout(m.dropout_rate, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, bias: Optional[jax.Array],
               encoded: Optional[jax.Array] = None,
               cross_mask: Optional[jax.Array] = None,
               token_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None
               ) -> tuple[jax.Array, Optional[moe_lib.MoeOutput]]:
    """x [B, L, M] -> ([B, L, M], MoeOutput or None).

    mask bool[B, 1, L, L], bias f32[B|1, N, L, L] (None with rotary
    positions) and positions i32[B|1, L] (rotary) for self-attention;
    encoded [B, Li, M] and cross_mask bool[B, 1, L, Li] for cross-attention;
    token_ids i32[B, L], the inputs' ids (what hash routing reads).
    """
    h = self.pre_self_attention_norm(x)
    x = x + self.dropout(self.self_attention(h, h, mask=mask, bias=bias,
                                             positions=positions))
    if self.cross_attention is not None:
      h = self.pre_cross_attention_norm(x)
      x = x + self.dropout(self.cross_attention(h, encoded, mask=cross_mask))
    h = self.pre_mlp_norm(x)
    if self.sparse:
      y, moe_out = (_remat_call(self.mlp, h, token_ids) if self.remat_mlp
                    else self.mlp(h, token_ids))
    else:
      y, moe_out = self.mlp(h), None
    return x + self.dropout(y.astype(x.dtype)), moe_out


class Stack(nnx.Module):
  """A stack of layers with one shared relative position bias and a final norm."""

  def __init__(self, config: ml_collections.ConfigDict, *, name: str,
               num_layers: int, causal: bool, cross_attention: bool,
               rngs: nnx.Rngs):
    m, e = config.model, config.moe
    self.causal = causal
    self.remat = m.remat == "full"
    self.attention_window = m.attention_window
    self.relative_position_bias = attention.RelativePositionBias(
        m.relative_attention_num_buckets, m.num_heads,
        m.relative_attention_max_distance, bidirectional=not causal,
        init_scale=m.init_scale, rngs=rngs
    ) if m.position_embedding == "relative" else None
    sparse = sparse_layers(e, num_layers)
    kwargs = moe_layer_kwargs(config, name) if any(sparse) else None
    self.layers = nnx.List([
        TransformerLayer(config, cross_attention=cross_attention,
                         moe_kwargs=kwargs if s else None, rngs=rngs)
        for s in sparse])
    self.moe_layer_names = tuple(
        f"{name}/layer_{i}" for i, s in enumerate(sparse) if s)
    self.final_norm = rms_norm(config, rngs)
    self.dropout = attention.dropout(m.dropout_rate, rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array,
               positions: Optional[jax.Array] = None,
               key_positions: Optional[jax.Array] = None,
               encoded: Optional[jax.Array] = None,
               cross_mask: Optional[jax.Array] = None,
               token_ids: Optional[jax.Array] = None
               ) -> tuple[jax.Array, list[moe_lib.MoeOutput]]:
    """Embedded inputs x [B, L, M] -> (normed outputs [B, L, M], MoE outputs).

    token_ids: i32[B, L] the ids x embeds (for hash routing).
    positions: i32[B|1, L] for the relative position bias, rotary
      embeddings and the attention window (default 0..L-1).
    key_positions: i32[B|1, T] of the keys (default `positions`); decoding
      with a cache of T entries passes them (`switchjax.decoding`).
    """
    if positions is None:
      positions = jnp.arange(x.shape[1])[None]
    if key_positions is None:
      key_positions = positions
    bias = (None if self.relative_position_bias is None
            else self.relative_position_bias(positions, key_positions))
    if self.attention_window:
      mask = mask & attention.window_mask(positions, key_positions,
                                          self.attention_window,
                                          causal=self.causal)
    x = self.dropout(x)
    moe_outputs = []
    for layer in self.layers:
      args = (x, mask, bias, encoded, cross_mask, token_ids, positions)
      x, moe_out = _remat_call(layer, *args) if self.remat else layer(*args)
      if moe_out is not None:
        moe_outputs.append(moe_out)
    return self.dropout(self.final_norm(x)), moe_outputs


def _summarise(moe_outputs: list[moe_lib.MoeOutput],
               names: tuple[str, ...]) -> ModelAux:
  if not moe_outputs:
    zero = jnp.zeros((), jnp.float32)
    return ModelAux(aux_loss=zero, z_loss=zero, metrics=None, layer_names=())
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *moe_outputs)
  return ModelAux(aux_loss=jnp.mean(stacked.aux_loss).astype(jnp.float32),
                  z_loss=jnp.mean(stacked.z_loss).astype(jnp.float32),
                  metrics=stacked.metrics, layer_names=names)


class _LanguageModel(nnx.Module):
  """Shared token embedding and output head."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    self.dtype = to_dtype(m.dtype)
    self.tie_embeddings = m.tie_embeddings
    # A lookup reads one weight per output (fan_in 1): std sqrt(init_scale),
    # T5X's normal(1.0) at init_scale 1.
    self.embedding = attention.make_param(
        attention.truncated_normal_init(math.sqrt(m.init_scale)), rngs,
        (m.vocab_size, m.d_model), ("vocab", "embed"))
    self.head = None if m.tie_embeddings else attention.make_param(
        attention.truncated_normal_init(math.sqrt(m.init_scale / m.d_model)),
        rngs, (m.d_model, m.vocab_size), ("embed", "vocab"))
    # transformers 5's Switch with untied head: the encoder reads its own
    # input embedding (`embedding` is then the decoder's).
    self.encoder_embedding = attention.make_param(
        attention.truncated_normal_init(math.sqrt(m.init_scale)), rngs,
        (m.vocab_size, m.d_model), ("vocab", "embed")
    ) if m.separate_encoder_embedding else None

  def embed(self, tokens: jax.Array, table: Optional[nnx.Param] = None
            ) -> jax.Array:
    """i32[B, L] -> [B, L, M] in dtype, from `table` (default `embedding`)."""
    table = self.embedding if table is None else table
    x = jnp.take(table[...], tokens, axis=0).astype(self.dtype)
    return partitioning.with_logical_constraint(x, ("batch", "length", "embed"))

  def logits(self, x: jax.Array) -> jax.Array:
    """[B, L, M] -> f32[B, L, V]."""
    if self.tie_embeddings:
      # T5: the shared embedding is scaled by d_model^-0.5 as output layer.
      w = self.embedding[...].astype(self.dtype)
      logits = jnp.einsum("BLM,VM->BLV", x, w) * (x.shape[-1] ** -0.5)
    else:
      logits = jnp.einsum("BLM,MV->BLV", x, self.head[...].astype(self.dtype))
    return partitioning.with_logical_constraint(
        logits.astype(jnp.float32), ("batch", "length", "vocab"))


class EncoderDecoder(_LanguageModel):
  """T5.1.1 encoder-decoder; the decoder cross-attends to the encoder."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    m = config.model
    self.encoder = Stack(config, name="encoder", num_layers=m.num_encoder_layers,
                         causal=False, cross_attention=False, rngs=rngs)
    self.decoder = Stack(config, name="decoder", num_layers=m.num_decoder_layers,
                         causal=True, cross_attention=True, rngs=rngs)

  def encode(self, tokens: jax.Array, *,
             segment_ids: Optional[jax.Array] = None,
             positions: Optional[jax.Array] = None
             ) -> tuple[jax.Array, list[moe_lib.MoeOutput]]:
    """Encoder tokens i32[B, Li] (0 = padding) -> ([B, Li, M], MoE outputs)."""
    valid = tokens > 0
    mask = attention.make_attention_mask(
        valid, valid, query_segment_ids=segment_ids,
        key_segment_ids=segment_ids)
    return self.encoder(self.embed(tokens, self.encoder_embedding), mask=mask,
                        positions=positions, token_ids=tokens)

  def __call__(self, encoder_input_tokens: jax.Array,
               decoder_input_tokens: jax.Array, *,
               encoder_segment_ids: Optional[jax.Array] = None,
               decoder_segment_ids: Optional[jax.Array] = None,
               encoder_positions: Optional[jax.Array] = None,
               decoder_positions: Optional[jax.Array] = None
               ) -> tuple[jax.Array, ModelAux]:
    """i32[B, Li], i32[B, Lt] -> (logits f32[B, Lt, V], ModelAux).

    Encoder padding is token id 0. Decoder inputs start with id 0 (the
    shifted-right start token), so decoder padding comes from
    decoder_segment_ids (0 = padding) when given; without them the causal
    mask already hides trailing padding from every earlier position.
    """
    encoded, enc_moe = self.encode(encoder_input_tokens,
                                   segment_ids=encoder_segment_ids,
                                   positions=encoder_positions)
    enc_valid = encoder_input_tokens > 0
    dec_valid = (decoder_segment_ids > 0 if decoder_segment_ids is not None
                 else jnp.ones(decoder_input_tokens.shape, jnp.bool_))
    dec_mask = attention.make_attention_mask(
        dec_valid, dec_valid, causal=True,
        query_segment_ids=decoder_segment_ids,
        key_segment_ids=decoder_segment_ids)
    cross_mask = attention.make_attention_mask(
        dec_valid, enc_valid, query_segment_ids=decoder_segment_ids,
        key_segment_ids=encoder_segment_ids)
    x, dec_moe = self.decoder(
        self.embed(decoder_input_tokens), mask=dec_mask,
        positions=decoder_positions, encoded=encoded, cross_mask=cross_mask,
        token_ids=decoder_input_tokens)
    names = self.encoder.moe_layer_names + self.decoder.moe_layer_names
    return self.logits(x), _summarise(enc_moe + dec_moe, names)


class DecoderOnly(_LanguageModel):
  """Causal language model: the decoder stack without cross-attention."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.decoder = Stack(config, name="decoder",
                         num_layers=config.model.num_decoder_layers,
                         causal=True, cross_attention=False, rngs=rngs)

  def __call__(self, decoder_input_tokens: jax.Array, *,
               decoder_segment_ids: Optional[jax.Array] = None,
               decoder_positions: Optional[jax.Array] = None
               ) -> tuple[jax.Array, ModelAux]:
    """i32[B, L] -> (logits f32[B, L, V], ModelAux); padding as EncoderDecoder's decoder."""
    valid = (decoder_segment_ids > 0 if decoder_segment_ids is not None
             else jnp.ones(decoder_input_tokens.shape, jnp.bool_))
    mask = attention.make_attention_mask(
        valid, valid, causal=True, query_segment_ids=decoder_segment_ids,
        key_segment_ids=decoder_segment_ids)
    x, moe_outputs = self.decoder(self.embed(decoder_input_tokens), mask=mask,
                                  positions=decoder_positions,
                                  token_ids=decoder_input_tokens)
    return self.logits(x), _summarise(moe_outputs, self.decoder.moe_layer_names)


def build_model(config: ml_collections.ConfigDict, *,
                rngs: nnx.Rngs) -> EncoderDecoder | DecoderOnly:
  """The model that config.model.arch names, in training mode.

  rngs: 'params' for the init, 'dropout' (and optionally 'router') for the
  training-time randomness; a plain nnx.Rngs(seed) serves all of them.
  """
  # validate.prepare checks the config; an unknown arch is a KeyError here.
  cls = {"encoder_decoder": EncoderDecoder, "decoder_only": DecoderOnly}
  return cls[config.model.arch](config, rngs=rngs)


def param_counts(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(total params, params active per token), from abstract shapes only.

  Active counts each MoE layer's experts K times instead of E times (K = the
  layer's experts per token; for expert choice the train capacity factor,
  its average number of experts per token). The router, attention, norms,
  embedding (once) and output head count fully.

  Counts per layer kind: a stack's layers are all alike but for dense vs
  sparse, so it builds (abstractly) one layer of each kind per stack, the
  stack without layers and the embeddings, and multiplies. Tracing the whole
  model at once is quadratic in its size (10-25 s for the paper configs).
  """
  m, e = config.model, config.moe
  stacks = [("decoder", m.num_decoder_layers, m.arch == "encoder_decoder")]
  if m.arch == "encoder_decoder":
    stacks.insert(0, ("encoder", m.num_encoder_layers, False))

  def size(node) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(node, nnx.Param)))

  def abstract(build):
    return nnx.eval_shape(lambda: build(nnx.Rngs(0)))

  total = size(abstract(lambda rngs: _LanguageModel(config, rngs=rngs)))
  active = float(total)
  for name, num_layers, cross in stacks:
    shell = size(abstract(lambda rngs: Stack(
        config, name=name, num_layers=0, causal=name == "decoder",
        cross_attention=cross, rngs=rngs)))
    total += shell
    active += shell
    num_sparse = sum(sparse_layers(e, num_layers))
    kwargs = moe_layer_kwargs(config, name) if num_sparse else None
    for count, moe_kwargs in ((num_layers - num_sparse, None),
                              (num_sparse, kwargs)):
      if not count:
        continue
      layer = abstract(lambda rngs: TransformerLayer(
          config, cross_attention=cross, moe_kwargs=moe_kwargs, rngs=rngs))
      total += count * size(layer)
      active += count * size(layer)
      node = layer.mlp
      if isinstance(node, soft_moe.SoftMoeLayer):
        # Each token's share of the E * C slots of its group of S tokens.
        s = node.group_size or (config.data.inputs_length if name == "encoder"
                                else config.data.seq_length)
        k = node.num_experts * node.slots_per_expert / s
      elif isinstance(node, moe_lib.MoeLayer):
        k = (node.train_capacity_factor if node.router_name == "expert_choice"
             else node.num_selected)
      else:
        continue
      active += count * size(node.experts) * (k / node.num_experts - 1.0)
  return total, int(round(active))
