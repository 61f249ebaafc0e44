"""Hugging Face T5 / Switch <-> switchjax: config keys and tensor names.

`config_from_hf` and `hf_config` map `config.json` of
`T5ForConditionalGeneration` (v1.0 ReLU, v1.1 gated-GELU) and
`SwitchTransformersForConditionalGeneration` to a switchjax config and back;
`params_from_hf` and `hf_tensors` map their tensors. Only transposes and
reshapes, so a round trip is bit for bit. Where the implementations differ
by design, the switchjax config takes Hugging Face's choice:

  * HF routes each sequence as one group with a fixed `expert_capacity`:
    moe.group_size = 0, moe.expert_capacity = expert_capacity.
  * HF's sparse layers are those with i % step == 1 (every layer when
    step == 1): moe.sparse_every = step, moe.sparse_offset = 1.
  * torch Linear weights are [out, in]; ours [in, out], attention's split
    into heads: q/k/v f32[N * D, M] -> f32[M, N, D], o f32[M, N * D] ->
    f32[N, D, M]; experts' E tensors are stacked into f32[E, M, H].

Refusals (`LayoutError`, one line) name the key that has no counterpart.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import ml_collections
import numpy as np

from switchjax import config_base
from switchjax import ffn
from switchjax import model as model_lib

SWITCH = "SwitchTransformersForConditionalGeneration"
T5 = "T5ForConditionalGeneration"
ARCHITECTURES = (SWITCH, T5)
LAYER_NORM_EPSILON = 1e-6  # switchjax's RMSNorm epsilon
# The tied input embedding under the names a checkpoint may store it as.
EMBEDDING_ALIASES = ("shared.weight", "encoder.embed_tokens.weight",
                     "decoder.embed_tokens.weight")


class LayoutError(ValueError):
  """A checkpoint or config one side cannot express (one line)."""


def architecture(hf: dict) -> str:
  names = hf.get("architectures") or []
  known = [a for a in names if a in ARCHITECTURES]
  if not known:
    raise LayoutError(
        f"config.json architectures {names or '(none)'}: switchjax converts "
        f"{' and '.join(ARCHITECTURES)}")
  return known[0]


def hf_sparse_layers(num_layers: int, num_sparse: int) -> list[bool]:
  """HF's rule: step = L // num_sparse (L when 0), sparse iff i % step == 1.

  Step 1 makes every layer sparse. num_sparse 0 still makes layer 1 sparse
  when L > 1 (HF's "HACK" step = L), and we follow what HF builds.
  """
  step = num_layers // num_sparse if num_sparse > 0 else num_layers
  return [step > 0 and (i % step == 1 or step == 1) for i in range(num_layers)]


# ---------------------------------------------------------------------------
# Config.


def _need(hf: dict, key: str, allowed, what: str) -> None:
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise LayoutError(f"config.json {key}={value!r}: switchjax has {what}")


def _sparse_layout(hf: dict) -> tuple[int, int]:
  """(moe.sparse_every, moe.sparse_offset) that build HF's sparse layers."""
  enc = hf_sparse_layers(hf["num_layers"], hf["num_sparse_encoder_layers"])
  dec = hf_sparse_layers(hf["num_decoder_layers"],
                         hf["num_sparse_decoder_layers"])
  for every in range(1, max(len(enc), len(dec)) + 1):
    for offset in range(every):
      if all(model_lib.is_sparse_layer(i, 1, every, offset) == s
             for layers in (enc, dec) for i, s in enumerate(layers)):
        return every, (-1 if offset == every - 1 else offset)
  raise LayoutError(
      "config.json num_sparse_encoder_layers="
      f"{hf['num_sparse_encoder_layers']} and num_sparse_decoder_layers="
      f"{hf['num_sparse_decoder_layers']} give sparse layers (encoder "
      f"{[i for i, s in enumerate(enc) if s]}, decoder "
      f"{[i for i, s in enumerate(dec) if s]}) that one moe.sparse_every / "
      "moe.sparse_offset cannot place")


def tie_embeddings(hf: dict, arch: str) -> bool:
  """Whether the output head is the d_model^-0.5-scaled input embedding.

  transformers 5 forces T5's `tie_word_embeddings` to True and keeps the
  v1.1 choice (untied, unscaled) in `scale_decoder_outputs`.
  """
  if arch == T5 and "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return hf.get("tie_word_embeddings", True) is not False


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """A full switchjax config (config_base keys) computing what `hf` does."""
  arch = architecture(hf)
  c = config_base.base_config()
  m, e = c.model, c.moe
  _need(hf, "layer_norm_epsilon", (LAYER_NORM_EPSILON,),
        f"RMSNorm epsilon {LAYER_NORM_EPSILON} only")
  if not hf.get("is_encoder_decoder", True):
    raise LayoutError("config.json is_encoder_decoder=False: switchjax "
                      "converts the encoder-decoder classes")
  m.arch = "encoder_decoder"
  m.vocab_size = int(hf["vocab_size"])
  m.d_model = int(hf["d_model"])
  m.num_heads = int(hf["num_heads"])
  m.head_dim = int(hf["d_kv"])
  m.d_ff = int(hf["d_ff"])
  m.num_encoder_layers = int(hf["num_layers"])
  m.num_decoder_layers = int(hf.get("num_decoder_layers") or hf["num_layers"])
  m.relative_attention_num_buckets = int(hf.get("relative_attention_num_buckets", 32))
  m.relative_attention_max_distance = int(hf.get("relative_attention_max_distance", 128))
  m.dropout_rate = float(hf.get("dropout_rate", 0.1))
  m.tie_embeddings = tie_embeddings(hf, arch)
  m.dtype = "float32"  # scores as transformers does in float32
  if arch == T5:
    _need(hf, "feed_forward_proj", ("relu", "gated-gelu"),
          "the 'relu' and 'gated-gelu' FFNs")
    m.activation = ("gated_gelu" if hf.get("feed_forward_proj") == "gated-gelu"
                    else "relu")
    return c
  _need(hf, "dense_act_fn", ("relu",), "Switch's ReLU experts only")
  _need(hf, "router_bias", (False,), "routers without a bias")
  _need(hf, "router_dtype", ("float32", "bfloat16"),
        "float32 and bfloat16 routers")
  m.activation = "relu"
  e.num_experts = int(hf["num_experts"])
  e.sparse_every, e.sparse_offset = _sparse_layout(hf)
  e.router = "switch"
  e.group_size = 0
  e.expert_capacity = int(hf["expert_capacity"])
  e.router_jitter = float(hf.get("router_jitter_noise", 0.0))
  e.router_dtype = hf.get("router_dtype", "float32")
  e.aux_loss_coef = float(hf.get("router_aux_loss_coef", 0.001))
  e.z_loss_coef = float(hf.get("router_z_loss_coef", 0.001))
  return c


def _refuse_unless(ok: bool, key: str, value: Any, why: str) -> None:
  if not ok:
    raise LayoutError(f"{key}={value!r}: {why}")


def hf_config(config: ml_collections.ConfigDict, base: Optional[dict] = None,
              expert_capacity: int = 0) -> dict:
  """config.json for `config`, starting from `base` (the converted source's).

  A dense model becomes T5ForConditionalGeneration, an MoE
  SwitchTransformersForConditionalGeneration. expert_capacity > 0 exports a
  model that routed with capacity factors (or dropless) with HF's fixed
  per-sequence capacity instead.
  """
  m, e = config.model, config.moe
  _refuse_unless(m.arch == "encoder_decoder", "model.arch", m.arch,
                 "Hugging Face's T5 and Switch classes are encoder-decoders")
  for key, ok, why in (
      ("position_embedding", m.position_embedding == "relative",
       "T5 has relative position buckets, not rotary embeddings"),
      ("num_kv_heads", m.num_kv_heads in (0, m.num_heads),
       "T5 has one key/value head per query head"),
      ("attention_window", m.attention_window == 0,
       "T5 attends over the whole sequence"),
      ("norm_epsilon", m.norm_epsilon == LAYER_NORM_EPSILON,
       f"T5's RMSNorm epsilon is {LAYER_NORM_EPSILON}"),
      ("activation", m.activation in ("relu", "gated_gelu"),
       "T5 has relu or gated-gelu feed-forwards")):
    _refuse_unless(ok, f"model.{key}", m[key], why)
  sparse = e.num_experts > 0
  arch = SWITCH if sparse else T5
  hf = dict(base or {})
  if hf.get("architectures") and architecture(hf) != arch:
    hf = {}  # upcycled or otherwise changed: start afresh
  hf.update({
      "architectures": [arch],
      "model_type": "switch_transformers" if sparse else "t5",
      "vocab_size": m.vocab_size, "d_model": m.d_model,
      "num_heads": m.num_heads, "d_kv": m.head_dim, "d_ff": m.d_ff,
      "num_layers": m.num_encoder_layers,
      "num_decoder_layers": m.num_decoder_layers,
      "relative_attention_num_buckets": m.relative_attention_num_buckets,
      "relative_attention_max_distance": m.relative_attention_max_distance,
      "dropout_rate": m.dropout_rate,
      "layer_norm_epsilon": LAYER_NORM_EPSILON,
      "tie_word_embeddings": m.tie_embeddings,
      "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
      "decoder_start_token_id": 0,
  })
  if not sparse:
    hf["feed_forward_proj"] = ("gated-gelu" if m.activation == "gated_gelu"
                               else "relu")
    hf["scale_decoder_outputs"] = m.tie_embeddings
    return hf
  _refuse_unless(m.activation == "relu", "model.activation", m.activation,
                 "Hugging Face's Switch experts have no gated activation")
  for stack in ("encoder", "decoder"):
    router = model_lib.stack_router(e, stack)
    _refuse_unless(router == "switch", f"moe.{stack}_router / moe.router",
                   router, "Hugging Face's Switch has the top-1 router only")
  _refuse_unless(not e.batch_prioritized, "moe.batch_prioritized", True,
                 "Hugging Face's Switch claims slots in token order")
  _refuse_unless(e.d_ff in (-1, m.d_ff), "moe.d_ff", e.d_ff,
                 "Hugging Face's Switch experts have d_ff hidden units")
  if not expert_capacity:
    _refuse_unless(e.group_size == 0, "moe.group_size", e.group_size,
                   "Hugging Face's Switch routes each sequence as a group "
                   "(0); to export anyway, pass --expert_capacity N")
    _refuse_unless(e.expert_capacity > 0 and e.dispatch != "dropless",
                   "moe.expert_capacity", e.expert_capacity,
                   "Hugging Face's Switch has a fixed capacity; to export "
                   "anyway, pass --expert_capacity N")
  counts = {}
  for stack, layers in (("encoder", m.num_encoder_layers),
                        ("decoder", m.num_decoder_layers)):
    ours = model_lib.sparse_layers(e, layers)
    match = [n for n in range(layers + 1)
             if hf_sparse_layers(layers, n) == ours]
    _refuse_unless(bool(match), "moe.sparse_every / moe.sparse_offset",
                   (e.sparse_every, e.sparse_offset),
                   f"the {stack}'s sparse layers "
                   f"{[i for i, s in enumerate(ours) if s]} are not HF's i % "
                   "step == 1 for any step")
    counts[stack] = match[-1]
  hf.update({
      "num_experts": e.num_experts,
      "expert_capacity": expert_capacity or e.expert_capacity,
      "num_sparse_encoder_layers": counts["encoder"],
      "num_sparse_decoder_layers": counts["decoder"],
      "router_bias": False, "router_jitter_noise": e.router_jitter,
      "router_dtype": e.router_dtype,
      "router_aux_loss_coef": e.aux_loss_coef,
      "router_z_loss_coef": e.z_loss_coef, "dense_act_fn": "relu",
  })
  for stack, n in counts.items():
    layers = hf["num_layers" if stack == "encoder" else "num_decoder_layers"]
    hf[f"{stack}_sparse_step"] = layers // n if n else layers
  return hf


# ---------------------------------------------------------------------------
# Tensors.


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One switchjax param and the HF tensor(s) it is made of.

  kind: 'copy' (same layout), 'linear' (transposed), 'qkv' ([N*D, M] ->
  [M, N, D]), 'out' ([M, N*D] -> [N, D, M]); with several names (experts)
  each is mapped as `kind` and stacked on a new leading axis.
  """
  path: tuple
  names: tuple[str, ...]
  kind: str


def _attention(path: tuple, prefix: str) -> Iterator[Tensor]:
  for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
    yield Tensor(path + (ours,), (f"{prefix}.{theirs}.weight",), "qkv")
  yield Tensor(path + ("out",), (f"{prefix}.o.weight",), "out")


def _ffn(path: tuple, prefix: str, activation: str) -> Iterator[Tensor]:
  for name in ffn.wi_names(activation):
    yield Tensor(path + (name,), (f"{prefix}.{name}.weight",), "linear")
  yield Tensor(path + ("wo",), (f"{prefix}.wo.weight",), "linear")


def tensors(config: ml_collections.ConfigDict) -> list[Tensor]:
  """Every switchjax param of `config` with its HF name(s)."""
  m, e = config.model, config.moe
  switch = e.num_experts > 0
  if m.separate_encoder_embedding:
    out = [Tensor(("embedding",), ("decoder.embed_tokens.weight",), "copy"),
           Tensor(("encoder_embedding",), ("encoder.embed_tokens.weight",),
                  "copy")]
  else:
    out = [Tensor(("embedding",), ("shared.weight",), "copy")]
  if not m.tie_embeddings:
    out.append(Tensor(("head",), ("lm_head.weight",), "linear"))
  for stack, layers in (("encoder", m.num_encoder_layers),
                        ("decoder", m.num_decoder_layers)):
    sparse = model_lib.sparse_layers(e, layers)
    out.append(Tensor(
        (stack, "relative_position_bias", "embedding"),
        (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
        "copy"))
    out.append(Tensor((stack, "final_norm", "scale"),
                      (f"{stack}.final_layer_norm.weight",), "copy"))
    for i in range(layers):
      ours, theirs = (stack, "layers", i), f"{stack}.block.{i}.layer"
      out.append(Tensor(ours + ("pre_self_attention_norm", "scale"),
                        (f"{theirs}.0.layer_norm.weight",), "copy"))
      out.extend(_attention(ours + ("self_attention",),
                            f"{theirs}.0.SelfAttention"))
      ff = 1
      if stack == "decoder":
        ff = 2
        out.append(Tensor(ours + ("pre_cross_attention_norm", "scale"),
                          (f"{theirs}.1.layer_norm.weight",), "copy"))
        out.extend(_attention(ours + ("cross_attention",),
                              f"{theirs}.1.EncDecAttention"))
      out.append(Tensor(ours + ("pre_mlp_norm", "scale"),
                        (f"{theirs}.{ff}.layer_norm.weight",), "copy"))
      mlp = f"{theirs}.{ff}.mlp" if switch else f"{theirs}.{ff}.DenseReluDense"
      if not sparse[i]:
        out.extend(_ffn(ours + ("mlp",), mlp, m.activation))
        continue
      out.append(Tensor(ours + ("mlp", "router", "kernel"),
                        (f"{mlp}.router.classifier.weight",), "linear"))
      for t in _ffn(ours + ("mlp", "experts"), f"{mlp}.experts.expert_{{}}",
                    m.activation):
        out.append(Tensor(t.path, tuple(t.names[0].format(j)
                                        for j in range(e.num_experts)),
                          t.kind))
  return out


def _to_ours(kind: str, a: np.ndarray, shape: tuple) -> np.ndarray:
  # linear [out, in] -> [in, out]; qkv [N*D, M] -> [M, N, D]; out [M, N*D]
  # -> [N, D, M]: each a transpose, then the heads split.
  return a if kind == "copy" else a.T.reshape(shape)


def _to_hf(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return a
  if kind == "qkv":  # [M, N, D] -> [N*D, M]
    return a.reshape(a.shape[0], -1).T
  if kind == "out":  # [N, D, M] -> [M, N*D]
    return a.reshape(-1, a.shape[-1]).T
  return a.T


def _read(hf: dict[str, np.ndarray], name: str) -> np.ndarray:
  if name in hf:
    return hf[name]
  # transformers 5 ties T5's lm_head to the embedding even for v1.1 (which
  # does not scale the decoder output) and then saves no lm_head: the head
  # is the embedding, unscaled. Older checkpoints store one embedding only.
  for alias in _ALIASES.get(name, ()):
    if alias in hf:
      return hf[alias]
  raise LayoutError(f"tensor {name} is missing from the checkpoint")


# Where a tensor a checkpoint left out is found instead, in order.
_ALIASES = {
    "shared.weight": EMBEDDING_ALIASES,
    "lm_head.weight": EMBEDDING_ALIASES,
    "decoder.embed_tokens.weight": ("shared.weight",),
    "encoder.embed_tokens.weight": ("shared.weight",),
}


def alias_value(tensors: dict[str, np.ndarray], name: str
                ) -> Optional[np.ndarray]:
  """`name` from `tensors`, or from the tensor it is tied to; None if neither."""
  try:
    return _read(tensors, name)
  except LayoutError:
    return None


def separate_encoder_embedding(hf: dict[str, np.ndarray]) -> bool:
  """Whether the two stacks read different input embeddings.

  transformers 5 unties every embedding of a Switch model whose
  tie_word_embeddings is False: encoder.embed_tokens, decoder.embed_tokens
  and shared.weight are then three tensors.
  """
  enc = alias_value(hf, "encoder.embed_tokens.weight")
  dec = alias_value(hf, "decoder.embed_tokens.weight")
  return enc is not None and dec is not None and not np.array_equal(enc, dec)


def params_from_hf(hf: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                   shapes: dict[tuple, tuple]) -> dict[tuple, np.ndarray]:
  """HF tensors -> {param path: float32 array}, each checked against `shapes`.

  Refuses a missing tensor, a tensor of the wrong shape, and tensors the
  mapping does not know (they would be dropped silently otherwise).
  """
  table = tensors(config)
  known = {n for t in table for n in t.names} | set(EMBEDDING_ALIASES)
  if config.model.tie_embeddings:
    known.add("lm_head.weight")  # a tied head some checkpoints store anyway
  unknown = sorted(set(hf) - known)
  if unknown:
    raise LayoutError(f"tensor {unknown[0]} has no switchjax counterpart "
                      f"({len(unknown)} such)")
  if config.model.tie_embeddings and "lm_head.weight" in hf and not np.array_equal(
      hf["lm_head.weight"], _read(hf, "shared.weight")):
    raise LayoutError(
        "tensor lm_head.weight differs from the shared embedding, but the "
        "config ties them (tie_word_embeddings / scale_decoder_outputs)")
  out = {}
  for t in table:
    shape = tuple(shapes[t.path])
    parts = [_read(hf, n) for n in t.names]
    one = shape[1:] if len(t.names) > 1 else shape
    for name, part in zip(t.names, parts):
      want = _to_hf(t.kind, np.zeros(one, np.int8)).shape
      if tuple(part.shape) != want:
        raise LayoutError(f"tensor {name} has shape {tuple(part.shape)}, the "
                          f"config makes it {want}")
    arrays = [_to_ours(t.kind, np.asarray(p, np.float32), one) for p in parts]
    out[t.path] = arrays[0] if len(t.names) == 1 else np.stack(arrays)
  return out


def hf_tensors(params: dict[tuple, np.ndarray],
               config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """{param path: array} -> HF tensors (float32, contiguous), as HF saves them."""
  out = {}
  for t in tensors(config):
    a = np.asarray(params[t.path])
    parts = [a] if len(t.names) == 1 else list(a)
    for name, part in zip(t.names, parts):
      out[name] = np.ascontiguousarray(_to_hf(t.kind, part))
  return out


def named_as(tensors: dict[str, np.ndarray],
                  source_names) -> dict[str, np.ndarray]:
  """`tensors` under the names the source stored (aliases of the tied
  embedding included), when the source's names can all be made; else as is.

  HF checkpoints hold the tied embedding as shared.weight alone, or also as
  encoder/decoder.embed_tokens.weight; an untied head equal to the embedding
  may be absent (transformers 5 ties it).
  """
  if not source_names:
    return tensors
  out = {n: alias_value(tensors, n) for n in source_names}
  if any(v is None for v in out.values()):
    return tensors  # another structure now (e.g. upcycled)
  left = [n for n in set(tensors) - set(out)
          if not any(np.array_equal(tensors[n], v) for v in out.values())]
  return tensors if left else out
