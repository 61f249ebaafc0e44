"""DeepSeekMoE: fine-grained and shared experts (switchjax/shared_experts.py),
held against transformers' DeepSeek MoE block (the `hf-test` extra: torch),
and the config-level rules by hand."""
import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switchjax import freeze
from switchjax import model as model_lib
from switchjax import shared_experts
from switchjax import validate

from conftest import experiment

needs_torch = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
    reason="torch and transformers not installed (pip install -e '.[hf-test]')")

M, H, E, K, SHARED = 16, 8, 8, 3, 2


def _layer(**kw):
  args = dict(num_experts=E, router="topk", num_selected=K,
              normalize_weights=False, dispatch="dropless", group_size=0,
              activation="swiglu", num_shared_experts=SHARED,
              deterministic=True)
  args.update(kw)
  return shared_experts.SharedExpertsMoeLayer(M, H, rngs=nnx.Rngs(0), **args)


def copy_deepseek_weights(theirs, ours):
  """transformers' DeepSeek MoE block's weights into a SharedExpertsMoeLayer."""
  t = {n: p.detach().numpy() for n, p in theirs.named_parameters()}
  ours.router.kernel[...] = jnp.asarray(t["gate.weight"].T)
  gate_up = t["experts.gate_up_proj"]  # [E, 2H, M]: gate rows, then up rows
  h = gate_up.shape[1] // 2
  ours.experts.wi_0[...] = jnp.asarray(gate_up[:, :h].transpose(0, 2, 1))
  ours.experts.wi_1[...] = jnp.asarray(gate_up[:, h:].transpose(0, 2, 1))
  ours.experts.wo[...] = jnp.asarray(t["experts.down_proj"].transpose(0, 2, 1))
  shared = ours.shared_experts
  shared.wi_0[...] = jnp.asarray(t["shared_experts.gate_proj.weight"].T)
  shared.wi_1[...] = jnp.asarray(t["shared_experts.up_proj.weight"].T)
  shared.wo[...] = jnp.asarray(t["shared_experts.down_proj.weight"].T)


@needs_torch
def test_equals_transformers_deepseek_moe_block():
  """DeepseekV2Moe (greedy softmax top-K, no renormalisation, shared experts
  as one MLP of n_shared x moe_intermediate_size) on the same weights."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import DeepseekV2Config  # pylint: disable=g-import-not-at-top
  from transformers.models.deepseek_v2 import modeling_deepseek_v2  # pylint: disable=g-import-not-at-top
  cfg = DeepseekV2Config(
      hidden_size=M, num_attention_heads=2, num_key_value_heads=2,
      moe_intermediate_size=H, n_routed_experts=E, n_shared_experts=SHARED,
      num_experts_per_tok=K, topk_method="greedy", routed_scaling_factor=1.0,
      n_group=1, topk_group=1, hidden_act="silu", norm_topk_prob=False)
  torch.manual_seed(0)
  theirs = modeling_deepseek_v2.DeepseekV2Moe(cfg).eval()
  with torch.no_grad():
    for p in theirs.parameters():
      p.normal_(0.0, 0.5)
  ours = _layer()
  copy_deepseek_weights(theirs, ours)
  x = np.random.default_rng(0).normal(size=(2, 5, M)).astype(np.float32)
  with torch.no_grad():
    want = theirs(torch.tensor(x)).numpy()
  got, _ = ours(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  # Not vacuous: the shared experts carry a real share of the output.
  routed, _ = super(shared_experts.SharedExpertsMoeLayer, ours).__call__(
      jnp.asarray(x))
  assert np.abs(np.asarray(routed) - want).max() > 0.1


def test_output_is_the_routed_layer_plus_the_shared_ffn():
  layer = _layer()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, M)), jnp.float32)
  y, out = layer(x)
  routed, routed_out = super(shared_experts.SharedExpertsMoeLayer, layer).__call__(x)
  np.testing.assert_allclose(y, routed + layer.shared_experts(x), atol=1e-6)
  assert layer.shared_experts.wi_0.shape == (M, SHARED * H)
  np.testing.assert_array_equal(out.metrics.expert_load,
                                routed_out.metrics.expert_load)


def test_full_config_builds_deepseekmoe_16b_layers():
  c = experiment("deepseek_moe", "full")
  assert model_lib.routed_shape(c.moe, "topk") == (64, 6)
  assert model_lib.expert_d_ff(c) == 1408
  layers = model_lib.sparse_layers(c.moe, c.model.num_decoder_layers)
  assert layers[0] is False and all(layers[1:])
  kwargs = model_lib.moe_layer_kwargs(c, "decoder")
  assert (kwargs["num_experts"], kwargs["num_selected"],
          kwargs["num_shared_experts"]) == (64, 6, 2)
  # Dai et al. 2024: 16.4B total, 2.8B active (within 2 %).
  total, active = model_lib.param_counts(c)
  assert total == pytest.approx(16.4e9, rel=0.02)
  assert active == pytest.approx(2.8e9, rel=0.02)


def test_granularity_keeps_the_compute_of_top_k():
  """m x E experts of width H / m, m x K chosen: the active parameters of
  the coarse top-K layer (plus the router's m x E columns)."""
  coarse = experiment("deepseek_moe", "tiny")
  coarse.moe.expert_granularity, coarse.moe.num_shared_experts = 1, 0
  fine = experiment("deepseek_moe", "tiny")
  _, a_coarse = model_lib.param_counts(coarse)
  t_fine, a_fine = model_lib.param_counts(fine)
  t_coarse, _ = model_lib.param_counts(coarse)
  extra_router = (fine.moe.expert_granularity - 1) * fine.moe.num_experts * fine.model.d_model
  assert a_fine - a_coarse == extra_router
  assert t_fine - t_coarse == extra_router + (
      fine.moe.num_shared_experts * 3 * fine.model.d_model * model_lib.expert_d_ff(fine))


def test_freeze_recipes_count_shared_experts_as_experts():
  path = "decoder/layers/1/mlp/shared_experts/wi_0"
  assert freeze.is_frozen(path, "experts") and freeze.is_frozen(path, "moe")
  assert not freeze.is_frozen(path, "non_experts")
  assert not freeze.is_frozen(path, "router")


@pytest.mark.parametrize("change,message", [
    ({"moe.router": "gshard"}, "fixes its K; use 'topk'"),
    ({"moe.num_shared_experts": 8}, "none would be routed"),
    ({"moe.expert_granularity": 3}, "does not divide the experts' d_ff 256"),
])
def test_bad_layouts_are_refused_in_one_line(change, message):
  c = experiment("deepseek_moe", "tiny")
  for dotted, value in change.items():
    section, key = dotted.split(".")
    c[section][key] = value
  with pytest.raises(validate.ConfigError, match=message):
    validate.prepare(c, num_devices=1)
