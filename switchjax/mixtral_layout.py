"""Hugging Face `MixtralForCausalLM` -> switchjax: config keys and tensor names.

`config_from_hf` maps a Mixtral config.json to a decoder-only switchjax
config (RMSNorm, rotary positions, grouped-query attention, optional
sliding window, SwiGLU experts, top-K routing with renormalised weights,
dropless: Mixtral has no capacity); `params_from_hf` maps its tensors as
released checkpoints and transformers' `save_pretrained` store them:

  model.embed_tokens.weight                           -> embedding [V, M]
  model.layers.i.self_attn.{q,k,v,o}_proj.weight      -> self_attention
  model.layers.i.block_sparse_moe.gate.weight         -> mlp/router/kernel
  model.layers.i.block_sparse_moe.experts.j.w1/w3/w2  -> mlp/experts wi_0/wi_1/wo
  model.layers.i.{input,post_attention}_layernorm     -> pre_{self_attention,mlp}_norm
  model.norm.weight, lm_head.weight                   -> final_norm, head

torch Linear weights are [out, in] (ours [in, out], heads split). Mixtral
scales attention logits by D^-0.5 and switchjax folds that scaling into the
query weights (switchjax.attention), so the converted query is q_proj x
D^-0.5: the scores are the same, but the conversion is one-way (to-hf
refuses a decoder-only model in one line).

Differences that do not change a forward pass in eval mode: transformers'
router jitter (training only) multiplies the whole MoE input, switchjax's the
router's input only.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np

from switchjax import config_base
from switchjax import hf_layout

MIXTRAL = "MixtralForCausalLM"


def _need(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise hf_layout.LayoutError(f"config.json {key}={value!r}: {why}")


def rope_theta(hf: dict) -> float:
  """The rotary base: transformers 5's `rope_parameters`, or the older key."""
  params = hf.get("rope_parameters") or {}
  kind = params.get("rope_type", "default")
  _need(kind == "default", "rope_parameters.rope_type", kind,
        "switchjax has the default rotary embedding only")
  return float(params.get("rope_theta") or hf.get("rope_theta") or 1e6)


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """A full switchjax config (config_base keys) computing what `hf` does."""
  c = config_base.base_config()
  m, e, d = c.model, c.moe, c.data
  act = hf.get("hidden_act", "silu")
  _need(act == "silu", "hidden_act", act, "Mixtral's experts are SwiGLU (silu)")
  tied = hf.get("tie_word_embeddings", False)
  _need(not tied, "tie_word_embeddings", tied,
        "switchjax ties the head with T5's d_model^-0.5 scaling, Mixtral without")
  m.arch = "decoder_only"
  m.vocab_size = int(hf["vocab_size"])
  m.d_model = int(hf["hidden_size"])
  m.num_heads = int(hf["num_attention_heads"])
  m.num_kv_heads = int(hf.get("num_key_value_heads") or m.num_heads)
  m.head_dim = int(hf.get("head_dim") or m.d_model // m.num_heads)
  m.d_ff = int(hf["intermediate_size"])
  m.num_decoder_layers = int(hf["num_hidden_layers"])
  m.num_encoder_layers = 0
  m.activation = "swiglu"
  m.position_embedding = "rope"
  m.rope_theta = rope_theta(hf)
  m.attention_window = int(hf.get("sliding_window") or 0)
  m.norm_epsilon = float(hf.get("rms_norm_eps", 1e-5))
  m.tie_embeddings = False
  m.dropout_rate = float(hf.get("attention_dropout", 0.0))
  m.dtype = "float32"  # scores as transformers does in float32
  e.num_experts = int(hf["num_local_experts"])
  e.sparse_every, e.sparse_offset = 1, -1
  e.router = "topk"
  e.num_selected = int(hf["num_experts_per_tok"])
  e.normalize_weights = True
  e.dispatch = "dropless"
  e.group_size = 0
  e.router_jitter = float(hf.get("router_jitter_noise", 0.0))
  e.aux_loss_coef = float(hf.get("router_aux_loss_coef", 0.001))
  e.z_loss_coef = 0.0
  d.seq_length = min(int(hf.get("max_position_embeddings", 4096)), 4096)
  return c


def tensor_names(config: ml_collections.ConfigDict) -> dict[tuple, tuple[str, ...]]:
  """Every switchjax param of `config` -> its HF tensor name(s) (several
  for experts, stacked on a new leading axis)."""
  m, e = config.model, config.moe
  out = {("embedding",): ("model.embed_tokens.weight",),
         ("head",): ("lm_head.weight",),
         ("decoder", "final_norm", "scale"): ("model.norm.weight",)}
  for i in range(m.num_decoder_layers):
    ours, theirs = ("decoder", "layers", i), f"model.layers.{i}"
    out[ours + ("pre_self_attention_norm", "scale")] = (
        f"{theirs}.input_layernorm.weight",)
    out[ours + ("pre_mlp_norm", "scale")] = (
        f"{theirs}.post_attention_layernorm.weight",)
    for name, proj in (("query", "q"), ("key", "k"), ("value", "v"),
                       ("out", "o")):
      out[ours + ("self_attention", name)] = (
          f"{theirs}.self_attn.{proj}_proj.weight",)
    moe = f"{theirs}.block_sparse_moe"
    out[ours + ("mlp", "router", "kernel")] = (f"{moe}.gate.weight",)
    for name, w in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
      out[ours + ("mlp", "experts", name)] = tuple(
          f"{moe}.experts.{j}.{w}.weight" for j in range(e.num_experts))
  return out


def _to_ours(path: tuple, a: np.ndarray, shape: tuple, head_dim: int
             ) -> np.ndarray:
  """One HF tensor (float32) in the layout of the param at `path`."""
  leaf = path[-1]
  if leaf in ("embedding", "scale"):
    return a
  if leaf == "out":  # [M, N*D] -> [N, D, M]
    return a.T.reshape(shape)
  out = a.T.reshape(shape)  # [out, in] -> [in, out]; q/k/v [M, N|J, D]
  return out * np.float32(head_dim ** -0.5) if leaf == "query" else out


def params_from_hf(hf: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                   shapes: dict[tuple, tuple]) -> dict[tuple, np.ndarray]:
  """HF tensors -> {param path: float32 array}, each checked against `shapes`.

  Refuses a missing tensor, one of the wrong shape, and tensors the mapping
  does not know (biases, for one: they would be dropped silently).
  """
  table = tensor_names(config)
  unknown = sorted(set(hf) - {n for names in table.values() for n in names})
  if unknown:
    raise hf_layout.LayoutError(
        f"tensor {unknown[0]} has no switchjax counterpart ({len(unknown)} such)")
  out = {}
  for path, names in table.items():
    shape = tuple(shapes[path])
    one = shape[1:] if len(names) > 1 else shape
    # The HF shape of one part: torch's [out, in] of our [in, ..., out].
    want = one if path[-1] in ("embedding", "scale") else (
        (one[-1], math.prod(one[:-1])) if path[-1] == "out"
        else (math.prod(one[1:]), one[0]))
    parts = []
    for name in names:
      if name not in hf:
        raise hf_layout.LayoutError(f"tensor {name} is missing from the checkpoint")
      if tuple(hf[name].shape) != want:
        raise hf_layout.LayoutError(
            f"tensor {name} has shape {tuple(hf[name].shape)}, the config "
            f"makes it {want}")
      parts.append(_to_ours(path, np.asarray(hf[name], np.float32), one,
                            config.model.head_dim))
    out[path] = parts[0] if len(parts) == 1 else np.stack(parts)
  return out
