"""Mistral/Mixtral blocks (rotary positions, grouped-query and sliding-window
attention, SwiGLU) by hand, and a converted MixtralForCausalLM held against
transformers itself (the `hf-test` extra: torch)."""
import importlib.util
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switchjax import attention
from switchjax import ffn
from switchjax import hf_convert
from switchjax import hf_layout
from switchjax import mixtral_layout
from switchjax import score as score_lib

needs_torch = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
    reason="torch and transformers not installed (pip install -e '.[hf-test]')")


def test_rope_rotates_pairs_by_hand():
  # D = 4, theta = 100: dims (0, 2) turn by p rad, dims (1, 3) by p / 10.
  x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
  p = 3.0
  got = np.asarray(attention.rope(x, jnp.array([[p]]), 100.0)).ravel()
  c1, s1, c2, s2 = math.cos(p), math.sin(p), math.cos(p / 10), math.sin(p / 10)
  want = [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Position 0 is the identity.
  np.testing.assert_array_equal(
      np.asarray(attention.rope(x, jnp.zeros((1, 1), jnp.int32), 100.0)), x)


def test_rope_scores_depend_on_the_offset_only():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def score(pq, pk):
    rq = attention.rope(q, jnp.array([[pq]]), 10000.0)
    rk = attention.rope(k, jnp.array([[pk]]), 10000.0)
    return float(jnp.sum(rq * rk))
  assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-5)
  assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_window_mask_by_hand():
  pos = jnp.arange(5)[None]
  causal = np.asarray(attention.window_mask(pos, pos, 2, causal=True))[0, 0]
  # Query i sees keys i - 1 and i (the causal mask removes the future).
  want = np.array([[abs(i - j) < 2 or j > i for j in range(5)]
                   for i in range(5)])
  np.testing.assert_array_equal(causal, want)
  both = np.asarray(attention.window_mask(pos, pos, 2, causal=False))[0, 0]
  np.testing.assert_array_equal(
      both, [[abs(i - j) < 2 for j in range(5)] for i in range(5)])


def test_grouped_query_attention_equals_repeated_key_value_heads():
  """J = 2 key/value heads for N = 4 query heads is multi-head attention
  whose heads 2h and 2h + 1 share key/value weights (repeat_kv's order)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 16)), jnp.float32)
  gqa = attention.MultiHeadAttention(16, 4, 8, num_kv_heads=2, rope_theta=1e4,
                                     rngs=nnx.Rngs(0))
  mha = attention.MultiHeadAttention(16, 4, 8, rope_theta=1e4, rngs=nnx.Rngs(1))
  mha.query[...] = gqa.query[...]
  mha.out[...] = gqa.out[...]
  mha.key[...] = jnp.repeat(gqa.key[...], 2, axis=1)
  mha.value[...] = jnp.repeat(gqa.value[...], 2, axis=1)
  assert gqa.key.shape == (16, 2, 8)
  pos = jnp.arange(6)[None]
  mask = attention.make_attention_mask(jnp.ones((2, 6), bool),
                                       jnp.ones((2, 6), bool), causal=True)
  np.testing.assert_allclose(gqa(x, x, mask=mask, positions=pos),
                             mha(x, x, mask=mask, positions=pos), atol=1e-6)


def test_swiglu_is_silu_gate_times_up():
  a, b = jnp.array([-1.0, 0.5, 2.0]), jnp.array([3.0, -2.0, 0.25])
  got = ffn.activate((a, b), "swiglu")
  np.testing.assert_allclose(got, a / (1 + np.exp(-a)) * b, rtol=1e-6)
  assert ffn.wi_names("swiglu") == ("wi_0", "wi_1")


# ---------------------------------------------------------------------------
# MixtralForCausalLM, converted.


def _hf_config(**kw):
  cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=40,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_local_experts=4, num_experts_per_tok=2,
             max_position_embeddings=64, sliding_window=None,
             tie_word_embeddings=False,
             rope_parameters={"rope_theta": 100.0, "rope_type": "default"})
  cfg.update(kw)
  return cfg


def _save_random_mixtral(path, seed=0, **kw):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = transformers.MixtralForCausalLM(
      transformers.MixtralConfig(**_hf_config(**kw))).eval()
  with torch.no_grad():  # weights large enough that routing and RoPE matter
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  model.save_pretrained(str(path))
  return model


@needs_torch
@pytest.mark.parametrize("window", [0, 5])
def test_converted_mixtral_scores_as_transformers(window, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  model = _save_random_mixtral(tmp_path / "hf", sliding_window=window or None)
  ids = np.random.default_rng(0).integers(3, 96, (2, 12)).astype(np.int32)
  with torch.no_grad():
    out = model(torch.tensor(ids, dtype=torch.long), output_router_logits=True)
  hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "wd"))
  np.savez(tmp_path / "in.npz", decoder_input_tokens=ids,
           decoder_target_tokens=ids)
  score_lib.score_file(str(tmp_path / "wd"), str(tmp_path / "in.npz"),
                       str(tmp_path / "out.npz"))
  ours = dict(np.load(tmp_path / "out.npz"))
  np.testing.assert_allclose(ours["logits"], out.logits.numpy(), atol=2e-5,
                             rtol=1e-5)
  # The same two experts per token, in order, and none dropped (dropless).
  assert list(ours["moe_layers"]) == ["decoder/layer_0", "decoder/layer_1"]
  for i, logits in enumerate(out.router_logits):
    want = torch.topk(logits, 2, dim=-1).indices.numpy().reshape(2, 12, 2)
    np.testing.assert_array_equal(ours[f"decoder/layer_{i}/expert"], want)
    assert not ours[f"decoder/layer_{i}/dropped"].any()
  if window:  # not vacuous: the window changes transformers' own logits
    other = _save_random_mixtral(tmp_path / "nowin")
    with torch.no_grad():
      full = other(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(full - out.logits.numpy())[:, window:].max() > 1e-2
    np.testing.assert_allclose(full[:, :window], out.logits.numpy()[:, :window],
                               atol=1e-5)


def _write_hf(path, config, tensors):
  from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  safetensors_np.save_file(tensors, str(path / "model.safetensors"))


def _mixtral_tensors(cfg):
  """Zero tensors with the names and shapes a Mixtral checkpoint has."""
  m, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  d = m // cfg["num_attention_heads"]
  kv = cfg["num_key_value_heads"] * d
  out = {"model.embed_tokens.weight": (v, m), "lm_head.weight": (v, m),
         "model.norm.weight": (m,)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    out.update({f"{p}.input_layernorm.weight": (m,),
                f"{p}.post_attention_layernorm.weight": (m,),
                f"{p}.self_attn.q_proj.weight": (m, m),
                f"{p}.self_attn.k_proj.weight": (kv, m),
                f"{p}.self_attn.v_proj.weight": (kv, m),
                f"{p}.self_attn.o_proj.weight": (m, m),
                f"{p}.block_sparse_moe.gate.weight":
                    (cfg["num_local_experts"], m)})
    for j in range(cfg["num_local_experts"]):
      e = f"{p}.block_sparse_moe.experts.{j}"
      out.update({f"{e}.w1.weight": (f, m), f"{e}.w3.weight": (f, m),
                  f"{e}.w2.weight": (m, f)})
  return {n: np.zeros(s, np.float32) for n, s in out.items()}


def test_mixtral_layout_without_torch(tmp_path):
  """The mapping itself: the query carries Mixtral's D^-0.5, experts stack."""
  cfg = dict(_hf_config(), architectures=[mixtral_layout.MIXTRAL])
  tensors = _mixtral_tensors(cfg)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(32, 32)).astype(np.float32)
  w1 = rng.normal(size=(40, 32)).astype(np.float32)
  tensors["model.layers.1.self_attn.q_proj.weight"] = q
  tensors["model.layers.0.block_sparse_moe.experts.3.w1.weight"] = w1
  _write_hf(tmp_path / "hf", cfg, tensors)
  config, params, source = hf_convert.hf_checkpoint.read_hf(str(tmp_path / "hf"))
  assert source["architecture"] == mixtral_layout.MIXTRAL
  m = config.model
  assert (m.arch, m.num_kv_heads, m.head_dim, m.rope_theta, m.norm_epsilon) == (
      "decoder_only", 2, 8, 100.0, 1e-5)
  query = params[("decoder", "layers", 1, "self_attention", "query")]
  np.testing.assert_allclose(query, q.T.reshape(32, 4, 8) / math.sqrt(8),
                             rtol=1e-6)
  experts = params[("decoder", "layers", 0, "mlp", "experts", "wi_0")]
  assert experts.shape == (4, 32, 40)
  np.testing.assert_array_equal(experts[3], w1.T)


@pytest.mark.parametrize("change,message", [
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
     "rope_type='yarn'"),
    ({"architectures": ["LlamaForCausalLM"]}, "switchjax reads"),
    ({"extra_tensor": True}, "q_proj.bias has no switchjax counterpart"),
])
def test_mixtral_refusals_are_one_line(change, message, tmp_path):
  cfg = dict(_hf_config(), architectures=[mixtral_layout.MIXTRAL])
  tensors = _mixtral_tensors(cfg)
  if change.pop("extra_tensor", False):
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  cfg.update(change)
  _write_hf(tmp_path / "hf", cfg, tensors)
  with pytest.raises(hf_layout.LayoutError, match=message) as e:
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "wd"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "wd").exists()


def test_to_hf_refuses_a_decoder_only_model(tmp_path):
  cfg = dict(_hf_config(), architectures=[mixtral_layout.MIXTRAL])
  _write_hf(tmp_path / "hf", cfg, _mixtral_tensors(cfg))
  hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "wd"))
  with pytest.raises(hf_layout.LayoutError, match="model.arch='decoder_only'"):
    hf_convert.to_hf(str(tmp_path / "wd"), str(tmp_path / "back"))
  assert not (tmp_path / "back").exists()
