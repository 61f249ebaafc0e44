"""The analytic cost of a training step: matmul FLOPs and saved activations.

From the config alone (no arrays, no tracing), for `switchjax.plan`, the
memory check before a run (`switchjax.memory_plan`) and the benchmarks' FLOP
counts. Notation: see `switchjax/__init__.py`.

FLOPs follow Kaplan et al. / the Switch paper's Table 9: matmuls only (the
attention's QK^T and PV included; norms, softmax and the optimizer left
out), a multiply-add is 2 FLOPs, a training step is 3x the forward pass, and
an MoE layer counts its router plus K experts per token (model FLOPs: the
empty slots of the buffers are not work) unless `slots=True` counts every
buffer slot the experts compute (what the hardware runs).

Activations are the tensors the forward pass keeps for the backward one,
per token and layer, in the dtypes the model computes them in (T5's
pre-norm layer: switchjax/model.py), as Korthikanti et al. 2022 count them;
`memory_plan` checks them against XLA's compiled memory in tests/test_plan.py.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import ml_collections

from switchjax import ffn
from switchjax import model as model_lib
from switchjax import routing

# Bytes per element.
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_F32 = 4
_MASK = 4  # dropout: the u32 random bits XLA keeps per element


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a stack, as the cost model sees it.

  length: tokens per sequence of the stack (L, also the self-attention's
  keys T); cross: encoder tokens the layer cross-attends to (0 = none);
  moe: (S, E, C, K) of its MoE layer in training, None for a dense FFN.
  """
  stack: str
  length: int
  cross: int
  moe: tuple[int, int, int, int] | None


def layers(config: ml_collections.ConfigDict) -> list[Layer]:
  """Every layer of the model (encoder first), with its MoE shape."""
  m, d = config.model, config.data
  if m.arch == "encoder_decoder":
    stacks = [("encoder", m.num_encoder_layers, d.inputs_length, 0),
              ("decoder", m.num_decoder_layers, d.targets_length,
               d.inputs_length)]
  else:
    stacks = [("decoder", m.num_decoder_layers, d.seq_length, 0)]
  out = []
  for stack, count, length, cross in stacks:
    for sparse in model_lib.sparse_layers(config.moe, count):
      moe = _moe_shape(config, stack, length) if sparse else None
      out.append(Layer(stack, length, cross, moe))
  return out


def _moe_shape(config, stack: str, length: int) -> tuple[int, int, int, int]:
  """(S, E, C, K) of a stack's MoE layers in training (moe.MoeLayer.capacity)."""
  e = config.moe
  router = model_lib.stack_router(e, stack)
  num_experts, k = model_lib.routed_shape(e, router)
  tokens = config.train.batch_size * length
  s = min(e.group_size or length, tokens)
  if e.dispatch == "dropless":
    c = s
  elif e.expert_capacity > 0:
    c = min(e.expert_capacity, s)
  else:
    c = min(routing.expert_capacity(s, num_experts, e.train_capacity_factor,
                                    num_selected=k, min_capacity=e.min_capacity),
            s)
  return s, num_experts, c, k


def _ffn_mats(config) -> int:
  """Weight matrices of an FFN: wi (wi_0 and wi_1 when gated) and wo."""
  return 3 if config.model.activation in ffn.GATED else 2


def _expert_d_ff(config) -> int:
  return model_lib.expert_d_ff(config)


def _experts_per_token(config, layer: Layer, slots: bool) -> float:
  """Expert FFNs a token's compute pays for: K, or every slot (E * C / S),
  and the always-on shared experts (DeepSeekMoE)."""
  s, e, c, k = layer.moe
  if slots:
    return e * c / s + config.moe.num_shared_experts
  router = model_lib.stack_router(config.moe, layer.stack)
  # Expert choice: each expert takes cf * S / E tokens, cf per token on average.
  return (config.moe.train_capacity_factor if router == "expert_choice"
          else k) + config.moe.num_shared_experts


def forward_flops_per_sequence(config: ml_collections.ConfigDict, *,
                               slots: bool = False) -> dict[str, float]:
  """Forward matmul FLOPs of one sequence, by part, and their 'total'.

  Parts: attention (the q, k, v, o projections of self- and
  cross-attention), scores (their QK^T and PV), ffn (dense FFNs), experts,
  router, logits (the output layer, on the targets).
  """
  m = config.model
  inner = m.num_heads * m.head_dim
  kv_inner = (m.num_kv_heads or m.num_heads) * m.head_dim  # grouped-query
  proj = 2 * 2 * m.d_model * (inner + kv_inner)  # q, o and k, v of one token
  dense_ffn = _ffn_mats(config) * 2 * m.d_model * m.d_ff
  expert_ffn = _ffn_mats(config) * 2 * m.d_model * _expert_d_ff(config)
  parts = dict.fromkeys(
      ("attention", "scores", "ffn", "experts", "router", "logits"), 0.0)
  for layer in layers(config):
    n = layer.length
    keys = min(n, m.attention_window) if m.attention_window else n
    parts["attention"] += n * proj
    parts["scores"] += n * 2 * 2 * keys * inner
    if layer.cross:
      # q, o on the decoder's tokens, k, v on the encoder's.
      parts["attention"] += 2 * 2 * m.d_model * (inner * n + kv_inner * layer.cross)
      parts["scores"] += n * 2 * 2 * layer.cross * inner
    if layer.moe is None:
      parts["ffn"] += n * dense_ffn
    else:
      parts["experts"] += n * _experts_per_token(config, layer, slots) * expert_ffn
      parts["router"] += n * 2 * m.d_model * layer.moe[1]
  targets = (config.data.targets_length if m.arch == "encoder_decoder"
             else config.data.seq_length)
  parts["logits"] = targets * 2 * m.d_model * m.vocab_size
  parts["total"] = sum(parts.values())
  return parts


def train_flops_per_step(config: ml_collections.ConfigDict, *,
                         slots: bool = False) -> float:
  """Matmul FLOPs of one training step: 3x the forward pass of the batch."""
  return (3.0 * config.train.batch_size
          * forward_flops_per_sequence(config, slots=slots)["total"])


def tokens_per_sequence(config: ml_collections.ConfigDict) -> int:
  """Tokens a sequence feeds the model: inputs + targets, or the sequence."""
  d = config.data
  return (d.inputs_length + d.targets_length
          if config.model.arch == "encoder_decoder" else d.seq_length)


# ---------------------------------------------------------------------------
# Activations kept for the backward pass.


def _split(size: int, shards: int) -> float:
  """An axis of `size` split `shards` ways where it divides (partitioning's
  rule), else kept whole."""
  return size / shards if shards > 1 and size % shards == 0 else float(size)


@dataclasses.dataclass(frozen=True)
class Shards:
  """How activations are split: tokens over `batch` devices, heads, FFN
  hidden units and vocabulary over `model` ones."""
  batch: int = 1
  model: int = 1


def _layer_bytes(config, layer: Layer, shards: Shards) -> tuple[float, float]:
  """(bytes kept per token of the layer, of them what remat 'experts'
  recomputes), one device's share of the model axis."""
  m = config.model
  a = _DTYPE_BYTES[m.dtype]
  drop = m.dropout_rate > 0
  heads = _split(m.num_heads, shards.model)
  inner = heads * m.head_dim
  kv_inner = _split(m.num_kv_heads or m.num_heads, shards.model) * m.head_dim

  def attention(keys: int) -> float:
    # softmax output (f32), its cast, and with dropout the mask and the
    # dropped probs; the context; the output's dropout mask.
    probs = heads * keys * (_F32 + a + (_MASK + a if drop else 0))
    return probs + inner * a + (m.d_model * _MASK if drop else 0)

  # Residual input and normed input, q, k, v.
  kept = 2 * m.d_model * a + (inner + 2 * kv_inner) * a + attention(layer.length)
  if layer.cross:
    # Normed input, q; k and v of every encoder token, per decoder token.
    kept += (2 * m.d_model * a + inner * a + attention(layer.cross)
             + 2 * kv_inner * a * layer.cross / layer.length)
  gated = _ffn_mats(config) == 3
  kept += 2 * m.d_model * a  # the FFN's residual and normed inputs
  if layer.moe is None:
    hidden = _split(m.d_ff, shards.model)
    kept += hidden * a * (3 if gated else 2) + (hidden * (_MASK + a) if drop else 0)
    return kept + (m.d_model * _MASK if drop else 0), 0.0
  s, e, c, _ = layer.moe
  # buffer slots per token, and the shared experts' rows (no buffer, same cost)
  slots = e * c / s + config.moe.num_shared_experts
  hidden = _split(_expert_d_ff(config), shards.model)
  expert_drop = config.moe.expert_dropout > 0
  # Router logits and probabilities (f32), the dispatched buffers, the experts'
  # hidden units (pre- and post-activation) and outputs, the combine weights.
  experts = slots * (2 * m.d_model * a + hidden * a * (3 if gated else 2)
                     + (hidden * (_MASK + a) if expert_drop else 0))
  kept += 2 * e * _F32 + experts + e * c / s * _F32
  return kept + (m.d_model * _MASK if drop else 0), experts


def activation_bytes(config: ml_collections.ConfigDict,
                     shards: Shards = Shards()) -> float:
  """Bytes of activations one device keeps for the backward pass of a step.

  With model.remat 'full' each layer keeps only its input and recomputes
  the rest when its backward runs (one layer's worth live at a time);
  'experts' recomputes the experts' buffers of MoE layers likewise.
  """
  m = config.model
  a = _DTYPE_BYTES[m.dtype]
  sequences = config.train.batch_size / shards.batch
  per_layer = []
  for layer in layers(config):
    kept, experts = _layer_bytes(config, layer, shards)
    per_layer.append((layer.length * kept, layer.length * experts,
                      layer.length * m.d_model * a))
  if m.remat == "full":
    total = sum(x for _, _, x in per_layer) + max(k for k, _, _ in per_layer)
  elif m.remat == "experts":
    total = (sum(k - e for k, e, _ in per_layer)
             + max((e for _, e, _ in per_layer), default=0.0))
  else:
    total = sum(k for k, _, _ in per_layer)
  targets = (config.data.targets_length if m.arch == "encoder_decoder"
             else config.data.seq_length)
  # f32 logits, their log-softmax and the gradient of the logits.
  total += targets * 3 * _split(m.vocab_size, shards.model) * _F32
  return sequences * total


def all_to_all_bytes(config: ml_collections.ConfigDict,
                     mesh: Mapping[str, int]) -> float:
  """Bytes each device sends to others per step in the MoE layers' all-to-alls.

  A layer's buffers [G, E, C, M] go to the experts and back in the forward
  pass and both ways again in the backward one; split over the 'expert'
  axis, a device keeps 1/X of its share and sends the rest.
  """
  x = mesh.get("expert", 1)
  if x <= 1:
    return 0.0
  devices = math.prod(mesh.values())
  a = _DTYPE_BYTES[config.model.dtype]
  total = 0.0
  for layer in layers(config):
    if layer.moe is not None:
      s, e, c, _ = layer.moe
      groups = config.train.batch_size * layer.length / s
      total += 4 * groups * e * c * config.model.d_model * a
  return total / devices * (1 - 1 / x)
