"""Tests for switchjax.optim: schedules, per-expert Adafactor, AdamW, clipping."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from switchjax import config_base
from switchjax import moe
from switchjax import optim


def _config(**train):
  c = config_base.base_config()
  for key, value in train.items():
    c.train[key] = value
  return c


def _run(tx, params, grads_seq):
  """Applies tx to `params` for each grads in grads_seq; returns the updates."""
  state = tx.init(params)
  step = jax.jit(tx.update)
  out = []
  for grads in grads_seq:
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, state


# Schedules ------------------------------------------------------------------

@pytest.mark.parametrize("step,expected", [
    (0, 0.01), (1, 0.01), (9_999, 0.01), (10_000, 0.01),
    (40_000, 0.005), (250_000, 0.002), (1_000_000, 0.001)])
def test_rsqrt_schedule_is_t5s(step, expected):
  # T5: 0.01 for 10k steps, then 1/sqrt(step).
  schedule = optim.learning_rate_schedule(
      _config(schedule="rsqrt", learning_rate=0.01, warmup_steps=10_000))
  np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)
  np.testing.assert_allclose(schedule(step), min(0.01, 1 / math.sqrt(max(step, 1))),
                             rtol=1e-6)


@pytest.mark.parametrize("step,expected", [
    (0, 0.0), (50, 0.05), (100, 0.1), (10**6, 0.1)])
def test_constant_schedule_with_linear_warmup(step, expected):
  schedule = optim.learning_rate_schedule(
      _config(schedule="constant", learning_rate=0.1, warmup_steps=100))
  np.testing.assert_allclose(schedule(step), expected, rtol=1e-6, atol=1e-9)


def test_constant_schedule_without_warmup():
  schedule = optim.learning_rate_schedule(
      _config(schedule="constant", learning_rate=0.1, warmup_steps=0))
  for step in (0, 7, 10**6):
    np.testing.assert_allclose(schedule(step), 0.1, rtol=1e-6)


@pytest.mark.parametrize("step,expected", [
    (0, 0.0), (50, 0.5), (100, 1.0), (600, 0.5),
    (850, 0.5 * (1 + math.cos(math.pi * 0.75))), (1_100, 0.0)])
def test_cosine_schedule(step, expected):
  # Warm-up to 1.0 over 100 steps, cosine to 0 at num_steps = 1100.
  schedule = optim.learning_rate_schedule(_config(
      schedule="cosine", learning_rate=1.0, warmup_steps=100, num_steps=1_100))
  np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-6)


# Bad schedules and optimizer settings are validate.prepare's to refuse:
# tests/test_validate.py.


# Adafactor -----------------------------------------------------------------

E, M, H = 160, 128, 144  # E is the largest axis: optax would factor E and H.


def _adafactor_config():
  return _config(optimizer="adafactor", schedule="constant",
                 learning_rate=0.01, warmup_steps=0)


def _expert_problem(num_steps=3):
  """Expert weights whose scale differs a lot between experts, and grads."""
  k = iter(jax.random.split(jax.random.key(0), 16))
  expert_scale = (10.0 ** (jnp.arange(E) % 4 - 2))[:, None, None]
  params = {
      "layer": {"mlp": {
          "experts": {"wi": jax.random.normal(next(k), (E, M, H)) * expert_scale},
          "router": {"kernel": jax.random.normal(next(k), (M, E)) * 0.02}}},
      "norm": {"scale": jnp.ones((M,))},
  }
  grads_seq = [
      jax.tree.map(lambda p, kk=kk: jax.random.normal(kk, p.shape) * 3.0, params)
      for kk in jax.random.split(next(k), num_steps)]
  for g in grads_seq:  # gradients of very different size per expert too
    g["layer"]["mlp"]["experts"]["wi"] = g["layer"]["mlp"]["experts"]["wi"] / expert_scale
  return params, grads_seq


def _factored_states(state):
  return [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
          if isinstance(s, optax.FactoredState)]


def test_adafactor_factors_each_expert_over_its_own_matrix():
  params, _ = _expert_problem()
  state = optim.make_optimizer(_adafactor_config()).init(params)
  shapes = {(s.v_row.shape, s.v_col.shape) for s in _factored_states(state)}
  # Per expert [M, H] -> v_row [E, M], v_col [E, H]; the router [M, E] as one
  # matrix; the vector keeps a full v (v_row/v_col are placeholders).
  assert ((E, M), (E, H)) in shapes
  assert ((M,), (E,)) in shapes
  assert ((1,), (1,)) in shapes
  # What optax.adafactor alone would do: factor the two largest axes, E and H.
  optax_state = optax.adafactor(0.01).init(params)
  wi_row = optax_state[0].v_row["layer"]["mlp"]["experts"]["wi"]
  assert wi_row.shape == (M, H)


def test_adafactor_equals_optax_adafactor_run_per_expert():
  params, grads_seq = _expert_problem()
  ours, _ = _run(optim.make_optimizer(_adafactor_config()), params, grads_seq)

  # Reference: plain optax.adafactor (T5 defaults) run separately on every
  # expert's [M, H] slice, and on the non-expert leaves as a tree.
  ref_tx = optax.adafactor(learning_rate=0.01)
  wi = params["layer"]["mlp"]["experts"]["wi"]
  for e in (0, 1, 2, 3, 77, E - 1):
    ref, _ = _run(ref_tx, wi[e],
                  [g["layer"]["mlp"]["experts"]["wi"][e] for g in grads_seq])
    for step in range(len(grads_seq)):
      np.testing.assert_allclose(
          ours[step]["layer"]["mlp"]["experts"]["wi"][e], ref[step],
          rtol=2e-5, atol=1e-9, err_msg=f"expert {e}, step {step}")

  dense = lambda t: {"router": t["layer"]["mlp"]["router"], "norm": t["norm"]}
  ref, _ = _run(ref_tx, dense(params), [dense(g) for g in grads_seq])
  for step in range(len(grads_seq)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9),
                 dense(ours[step]), ref[step])

  # optax.adafactor on the whole [E, M, H] leaf mixes experts: not the same.
  mixed, _ = _run(ref_tx, wi, [g["layer"]["mlp"]["experts"]["wi"] for g in grads_seq])
  assert not np.allclose(mixed[-1], ours[-1]["layer"]["mlp"]["experts"]["wi"], rtol=1e-2)


def test_adafactor_factors_attention_as_embed_by_heads_times_kv():
  # query [M, N, D] and out [N, D, M] are factored as [M, N*D] / [N*D, M].
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  params = {"query": jax.random.normal(k1, (256, 4, 64)),
            "out": jax.random.normal(k2, (4, 64, 256))}
  grads = [{"query": jax.random.normal(k3, (256, 4, 64)),
            "out": jax.random.normal(k4, (4, 64, 256))}] * 2
  ours, state = _run(optim.make_optimizer(_adafactor_config()), params, grads)
  shapes = {(s.v_row.shape, s.v_col.shape) for s in _factored_states(state)}
  assert shapes == {((256,), (256,))}
  as_matrix = {"query": (256, 256), "out": (256, 256)}
  flat = lambda t: {n: x.reshape(as_matrix[n]) for n, x in t.items()}
  ref, _ = _run(optax.adafactor(0.01), flat(params), [flat(g) for g in grads])
  for a, b in zip(ours, ref):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-9),
                 flat(a), b)


def test_adafactor_has_no_momentum_by_default():
  params, _ = _expert_problem(1)
  plain = optim.make_optimizer(_adafactor_config()).init(params)
  c = _adafactor_config()
  c.train.adafactor_momentum = 0.9
  with_momentum = optim.make_optimizer(c).init(params)
  is_ema = lambda x: isinstance(x, optax.EmaState)
  count = lambda s: sum(is_ema(x) for x in jax.tree.leaves(s, is_leaf=is_ema))
  assert count(plain) == 0 and count(with_momentum) == 1


def test_weight_decay_is_decoupled_scaled_by_lr_and_skips_vectors():
  c = _adafactor_config()
  c.train.weight_decay = 0.1
  params = {"w": jnp.full((4, 3), 2.0), "scale": jnp.full((3,), 2.0)}
  zero = jax.tree.map(jnp.zeros_like, params)
  (updates,), _ = _run(optim.make_optimizer(c), params, [zero])
  # Zero gradient: Adafactor's direction is 0, only -lr * wd * w remains.
  np.testing.assert_allclose(updates["w"], -0.01 * 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["scale"], 0.0, atol=1e-12)


def test_adafactor_with_nnx_optimizer_on_moe_layer():
  layer = moe.MoeLayer(16, 32, num_experts=4, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(layer, optim.make_optimizer(_adafactor_config()),
                      wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))

  @nnx.jit
  def train_step(layer, opt, x):
    def loss_fn(layer):
      y, _ = layer(x)
      return jnp.mean(y ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(layer)
    opt.update(layer, grads)
    return loss

  before = layer.experts.wi[...].copy()
  losses = [float(train_step(layer, opt, x)) for _ in range(3)]
  assert np.all(np.isfinite(losses))
  assert not np.allclose(before, layer.experts.wi[...])
  # Per-expert statistics: the [4, 16, 32] weights keep a [4, 16, 32] full v
  # (16 < 128 is too small to factor), one count per expert.
  shapes = [x.shape for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(opt)))]
  assert (4, 16, 32) in shapes and (4,) in shapes


# AdamW and clipping ---------------------------------------------------------

def _quadratic(params):
  return sum(jnp.sum((p - 3.0) ** 2) for p in jax.tree.leaves(params))


def test_adamw_with_clipping_minimises_a_quadratic():
  c = _config(optimizer="adamw", schedule="constant", learning_rate=0.05,
              warmup_steps=0, grad_clip=1.0, weight_decay=1e-4)
  tx = optim.make_optimizer(c)
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_quadratic)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = _quadratic(params)
  for _ in range(400):
    params, state = step(params, state)
  assert _quadratic(params) < 1e-3 * start


def test_global_norm_clipping_scales_gradients_first():
  c = _config(optimizer="adamw", schedule="constant", learning_rate=0.1,
              warmup_steps=0, grad_clip=1.0)
  params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((3,))}
  grads = {"a": jnp.full((2, 2), 30.0), "b": jnp.full((3,), 40.0)}
  norm = math.sqrt(4 * 30.0 ** 2 + 3 * 40.0 ** 2)
  _, state = _run(optim.make_optimizer(c), params, [grads])
  # Adam's first moment after one step is (1 - b1) * the clipped gradient.
  mu = optax.tree_utils.tree_get(state, "mu")
  np.testing.assert_allclose(mu["a"], 0.1 * 30.0 / norm, rtol=1e-5)
  np.testing.assert_allclose(mu["b"], 0.1 * 40.0 / norm, rtol=1e-5)
  # Without clipping the moment sees the raw gradient.
  c.train.grad_clip = 0.0
  _, state = _run(optim.make_optimizer(c), params, [grads])
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["a"], 3.0,
                             rtol=1e-5)
