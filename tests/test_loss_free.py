"""Auxiliary-loss-free balancing (switchjax/loss_free.py): the bias-corrected
top-K against transformers' DeepSeek-V3 MoE block (the `hf-test` extra:
torch), the bias moves load toward uniform, takes no gradient, and survives
a kill and resume bit for bit."""
import importlib.util
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switchjax import hf_convert
from switchjax import loss_free
from switchjax import moe
from switchjax import shared_experts

import test_resume
from test_deepseek_moe import copy_deepseek_weights
from test_resume import (ROOT, assert_same_metrics, command, last_step,
                         read_metrics, run, wait_until)

env = test_resume.env  # the subprocesses' environment (a fixture)

needs_torch = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
    reason="torch and transformers not installed (pip install -e '.[hf-test]')")

M, H, E, K = 16, 8, 8, 3
BIAS = ("router", loss_free.BIAS)


@needs_torch
def test_equals_transformers_deepseek_v3_moe_block():
  """DeepseekV3MoE: sigmoid scores, e_score_correction_bias for the choice
  only, renormalised top-K times routed_scaling_factor, shared experts."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import DeepseekV3Config  # pylint: disable=g-import-not-at-top
  from transformers.models.deepseek_v3 import modeling_deepseek_v3  # pylint: disable=g-import-not-at-top
  cfg = DeepseekV3Config(
      hidden_size=M, num_attention_heads=2, num_key_value_heads=2,
      moe_intermediate_size=H, n_routed_experts=E, n_shared_experts=1,
      num_experts_per_tok=K, n_group=1, topk_group=1, norm_topk_prob=True,
      routed_scaling_factor=2.5, hidden_act="silu")
  torch.manual_seed(0)
  theirs = modeling_deepseek_v3.DeepseekV3MoE(cfg).eval()
  with torch.no_grad():
    for p in theirs.parameters():
      p.normal_(0.0, 0.5)
    theirs.gate.e_score_correction_bias.normal_(0.0, 0.3)
  ours = shared_experts.SharedExpertsMoeLayer(
      M, H, num_experts=E, router=loss_free.ROUTER, num_selected=K,
      score_func="sigmoid", normalize_weights=True, routed_scaling_factor=2.5,
      dispatch="dropless", group_size=0, activation="swiglu",
      num_shared_experts=1, deterministic=True, rngs=nnx.Rngs(0))
  copy_deepseek_weights(theirs, ours)
  bias = theirs.gate.e_score_correction_bias.numpy()
  getattr(ours.router, loss_free.BIAS)[...] = jnp.asarray(bias)
  x = np.random.default_rng(0).normal(size=(2, 6, M)).astype(np.float32)
  with torch.no_grad():
    want = theirs(torch.tensor(x)).numpy()
  got, _ = ours(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  # Not vacuous: without the bias other experts are chosen.
  getattr(ours.router, loss_free.BIAS)[...] = jnp.zeros(E)
  unbiased, _ = ours(jnp.asarray(x))
  assert np.abs(np.asarray(unbiased) - want).max() > 1e-2


def test_weights_are_the_unbiased_scores_by_hand():
  logits = jnp.log(jnp.array([[[1.0, 3.0, 1.0, 1.0 / 3.0]]]))  # sigmoid: .5 .75 .5 .25
  bias = jnp.array([0.0, -1.0, 0.0, 0.5])  # biased: .5 -.25 .5 .75
  r = loss_free.topk(logits, bias, capacity=1, num_selected=2,
                     normalize_weights=False, scaling=2.0)
  # Ranked by score + bias: expert 3 (.75), then expert 0 (.5, the lower
  # index of the tie with 2); weighted by the scores alone, times 2.
  np.testing.assert_array_equal(r.expert_index[0, 0], [3, 0])
  np.testing.assert_allclose(r.token_weight[0, 0], [0.5, 1.0], rtol=1e-6)


def test_bias_moves_a_skewed_router_toward_equal_load():
  """A router that sends most tokens to expert 0 and 1: the bias updates
  alone (the logits never change) spread the load."""
  rng = np.random.default_rng(0)
  skew = np.array([3.0, 2.0] + [0.0] * 6)
  logits = jnp.asarray(rng.normal(size=(4, 64, E)) + skew, jnp.float32)
  bias = jnp.zeros(E)

  def violation(bias):
    load = loss_free.topk(logits, bias, 64, 2).metrics.expert_load
    return float(jnp.max(load) / jnp.mean(load) - 1.0), load

  before, _ = violation(bias)
  for _ in range(300):
    _, load = violation(bias)
    bias = bias + 0.01 * jnp.sign(jnp.mean(load) - load)
  after, _ = violation(bias)
  assert before > 2.0  # experts 0 and 1 take most of the load
  assert after < 0.35
  assert bias[0] < 0 and bias[1] < 0 and jnp.all(bias[2:] > bias[0])


def _layer():
  return moe.MoeLayer(M, H, num_experts=E, router=loss_free.ROUTER,
                      num_selected=2, group_size=0, rngs=nnx.Rngs(0))


def test_bias_takes_no_gradient():
  layer = _layer()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, M)), jnp.float32)

  def loss(layer):
    y, out = layer(x)
    return jnp.sum(y ** 2) + out.aux_loss
  grads = nnx.grad(loss)(layer)
  assert not np.any(np.asarray(getattr(grads.router, loss_free.BIAS)[...]))
  assert np.any(np.asarray(grads.router.kernel[...]))  # the rest learns


def test_update_biases_follows_the_rule_layer_by_layer():
  params = {"decoder": {"layers": {1: {"mlp": {"router": {
      loss_free.BIAS: jnp.zeros(4), "kernel": jnp.ones((2, 4))}}}, 3: {"mlp": {
          "router": {loss_free.BIAS: jnp.ones(4)}}}}}}
  load = jnp.array([[0.4, 0.1, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
  out = loss_free.update_biases(params, load, ("decoder/layer_1",
                                               "decoder/layer_3"), 0.5)
  layers = out["decoder"]["layers"]
  np.testing.assert_array_equal(layers[1]["mlp"]["router"][loss_free.BIAS],
                                [-0.5, 0.5, 0.0, 0.0])
  np.testing.assert_array_equal(layers[3]["mlp"]["router"][loss_free.BIAS],
                                [1.5, 1.5, 0.5, 0.5])
  np.testing.assert_array_equal(layers[1]["mlp"]["router"]["kernel"],
                                np.ones((2, 4)))
  m = loss_free.metrics(out, load)
  assert float(m["balance_bias_range"]) == 1.0
  assert float(m["load_max_violation"]) == pytest.approx((0.6 + 0.6) / 2)


LOSS_FREE = {"moe.router": "loss_free", "moe.num_selected": 2,
             "moe.bias_update_rate": 0.01}


def _bias(workdir):
  _, _, params, _ = hf_convert.load_workdir(str(workdir))
  return params[("decoder", "layers", 0, "mlp") + BIAS]


def test_kill_and_resume_is_bit_exact(tmp_path, env):  # pylint: disable=redefined-outer-name
  steps = 8
  ref = tmp_path / "ref"
  out = run(command(ref, **LOSS_FREE, **{"train.num_steps": steps,
                                         "train.checkpoint_every": 4}), env)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = read_metrics(ref)
  ranges = [r["balance_bias_range"] for r in rows if "split" not in r]
  # One step moves each bias by the rate: the range grows by at most 2 rates.
  assert 0 < ranges[0] <= 2 * 0.01 + 1e-6
  assert all(b - a <= 2 * 0.01 + 1e-6 for a, b in zip(ranges, ranges[1:]))
  # The bias moved by the rule only: whole steps of the rate.
  bias = np.asarray(_bias(ref))
  np.testing.assert_allclose(bias / 0.01, np.round(bias / 0.01), atol=1e-3)
  assert np.abs(bias).max() > 0

  cmd = command(tmp_path / "w", **LOSS_FREE, **{"train.num_steps": steps,
                                               "train.checkpoint_every": 4})
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  wait_until(lambda: (tmp_path / "w" / "checkpoints" / "4").is_dir()
             and last_step(tmp_path / "w") > 4, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert last_step(tmp_path / "w") < steps, "killed too late to test anything"
  out = run(cmd, env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert_same_metrics(read_metrics(tmp_path / "w"), rows)
  np.testing.assert_array_equal(np.asarray(_bias(tmp_path / "w")), bias)


def test_grad_of_the_model_leaves_bias_alone_in_a_jitted_step():
  """The bias of a freshly built layer and after an optax step with a huge
  learning rate on the gradient: unchanged (only update_biases moves it)."""
  import optax  # pylint: disable=g-import-not-at-top
  layer = _layer()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, M)), jnp.float32)
  graphdef, params = nnx.split(layer, nnx.Param)
  tx = optax.adamw(10.0, weight_decay=0.1, mask=lambda p: jax.tree.map(
      lambda a: a.ndim >= 2, p))

  @jax.jit
  def step(params, opt_state):
    def loss(params):
      y, out = nnx.merge(graphdef, params)(x)
      return jnp.sum(y ** 2) + out.aux_loss
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  new, _ = step(params, tx.init(params))
  np.testing.assert_array_equal(new["router"][loss_free.BIAS][...],
                                params["router"][loss_free.BIAS][...])
  assert not np.array_equal(new["router"]["kernel"][...],
                            params["router"]["kernel"][...])
