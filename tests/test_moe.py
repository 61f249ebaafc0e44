"""Tests for switchjax.moe: the MoE layer, its two dispatch paths and its parts."""
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchjax import dispatch as dispatch_lib
from switchjax import experts as experts_lib
from switchjax import moe

M, H, E = 8, 16, 4


def _x(b=2, l=16, m=M, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, m), jnp.float32)


def _layer(**kw):
  args = dict(num_experts=E, group_size=8, min_capacity=1, rngs=nnx.Rngs(0))
  args.update(kw)
  return moe.MoeLayer(M, H, **args)


def _loss_and_grads(layer, x, cotangent):
  def loss_fn(layer, x):
    y, aux = layer(x)
    return jnp.sum(y * cotangent) + aux.aux_loss + aux.z_loss, (y, aux)
  (g_layer, g_x), (y, aux) = nnx.grad(
      loss_fn, argnums=(0, 1), has_aux=True)(layer, x)
  return y, aux, g_layer, g_x  # g_layer: State of the Params


# Train capacity factor 0.5 with groups of 8 tokens and 4 experts gives C = K
# slots per expert: every router drops tokens here.
ROUTER_CASES = {
    "switch": dict(router="switch"),
    "switch_bpr": dict(router="switch", batch_prioritized=True),
    "gshard_all": dict(router="gshard", activation="gated_gelu"),
    "gshard_random": dict(router="gshard", second_expert_policy="random"),
    "expert_choice": dict(router="expert_choice"),
    "topk2": dict(router="topk", num_selected=2),
    "topk2_bpr": dict(router="topk", num_selected=2, batch_prioritized=True),
    "topk3_unnormalized": dict(router="topk", num_selected=3, normalize_weights=False),
    "noisy_topk2": dict(router="noisy_topk", num_selected=2),
}


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_fast_matches_einsum_outputs_and_grads(case):
  kw = dict(ROUTER_CASES[case], train_capacity_factor=0.5)
  # Same seed: same params and the same rng streams (noise, random policy).
  fast = _layer(dispatch="gather", **kw)
  ref = _layer(dispatch="einsum", **kw)
  x = _x()
  cot = jax.random.normal(jax.random.key(1), x.shape)
  y_f, aux_f, g_f, gx_f = _loss_and_grads(fast, x, cot)
  y_e, aux_e, g_e, gx_e = _loss_and_grads(ref, x, cot)

  assert float(aux_f.metrics.dropped_fraction) > 0  # the case exercises drops
  np.testing.assert_allclose(y_f, y_e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx_f, gx_e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux_f.aux_loss, aux_e.aux_loss, rtol=1e-6)
  flat_f = dict(jax.tree_util.tree_leaves_with_path(g_f))
  flat_e = dict(jax.tree_util.tree_leaves_with_path(g_e))
  assert flat_f.keys() == flat_e.keys()
  for path in flat_f:
    np.testing.assert_allclose(flat_f[path], flat_e[path], rtol=1e-5,
                               atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # The router is trained through the combine weights in both paths.
  assert np.abs(g_f["router"]["kernel"][...]).max() > 0


def test_switch_matches_per_token_numpy_reference():
  """No drops: y_t = p_e* relu(x_t wi[e*]) wo[e*], e* = argmax_e x_t W_r."""
  layer = _layer(router="switch", train_capacity_factor=float(E))  # C = S
  x = _x()
  y, aux = layer(x)
  xt = np.asarray(x).reshape(-1, M)
  logits = xt @ np.asarray(layer.router.kernel[...])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  e = probs.argmax(-1)
  wi = np.asarray(layer.experts.wi[...])[e]  # [T, M, H]
  wo = np.asarray(layer.experts.wo[...])[e]
  h = np.maximum(np.einsum("tm,tmh->th", xt, wi), 0)
  expected = probs[np.arange(len(e)), e][:, None] * np.einsum("th,thm->tm", h, wo)
  assert float(aux.metrics.dropped_fraction) == 0
  np.testing.assert_allclose(np.asarray(y).reshape(-1, M), expected,
                             rtol=1e-5, atol=1e-6)


def _all_to_expert_0(layer):
  """Router kernel with only column 0 set: positive inputs all pick expert 0."""
  kernel = np.zeros((M, E), np.float32)
  kernel[:, 0] = 1.0
  layer.router.kernel[...] = jnp.asarray(kernel)


@pytest.mark.parametrize("dispatch", ["gather", "einsum"])
@pytest.mark.parametrize("capacity_factor", [1.0, 2.0])
def test_drop_fraction_and_zero_rows(dispatch, capacity_factor):
  s = 16
  layer = _layer(group_size=s, dispatch=dispatch,
                 train_capacity_factor=capacity_factor)
  _all_to_expert_0(layer)
  x = jnp.abs(_x(b=2, l=s)) + 0.1  # G = 2 groups of S = 16
  y, aux = layer(x)
  c = math.ceil(capacity_factor * s / E)  # 4 or 8 slots of expert 0
  assert layer.capacity(s) == c
  np.testing.assert_allclose(aux.metrics.dropped_fraction, 1 - c / s)
  rows = np.asarray(y)  # groups are the rows of the batch here
  # Token order within each group: the first C tokens take the slots.
  assert np.all(rows[:, c:] == 0.0)
  assert np.all(np.abs(rows[:, :c]).max(-1) > 0)
  np.testing.assert_allclose(aux.metrics.expert_load, [1, 0, 0, 0])


def test_eval_uses_eval_capacity_factor():
  s = 16
  layer = _layer(group_size=s, train_capacity_factor=1.0,
                 eval_capacity_factor=2.0)
  _all_to_expert_0(layer)
  x = jnp.abs(_x(b=2, l=s)) + 0.1
  _, aux_train = layer(x)
  layer.eval()
  assert layer.deterministic and layer.router.deterministic
  assert layer.capacity(s) == 8
  _, aux_eval = layer(x)
  layer.train()
  _, aux_train2 = layer(x)
  np.testing.assert_allclose(aux_train.metrics.dropped_fraction, 0.75)
  np.testing.assert_allclose(aux_eval.metrics.dropped_fraction, 0.5)
  np.testing.assert_allclose(aux_train2.metrics.dropped_fraction, 0.75)


def test_capacity_capped_at_group_size_and_counts_k():
  assert _layer(router="gshard", train_capacity_factor=1.0).capacity(8) == 4  # 2*8/4
  assert _layer(router="topk", num_selected=3,
                train_capacity_factor=1.0).capacity(8) == 6
  assert _layer(router="switch", train_capacity_factor=100.0).capacity(8) == 8
  # Switch and expert choice ignore num_selected (config default K = 1 and
  # gshard's K = 2 are the router's own).
  assert _layer(router="switch", num_selected=3).num_selected == 1
  assert _layer(router="gshard", num_selected=1).num_selected == 2


def test_bfloat16_model_keeps_float32_router():
  x = _x()
  layer16 = _layer(dtype=jnp.bfloat16, train_capacity_factor=float(E))
  layer32 = _layer(dtype=jnp.float32, train_capacity_factor=float(E))
  groups = dispatch_lib.group_tokens(x.astype(jnp.bfloat16), 8)
  logits, _ = layer16.router(groups)
  assert layer16.router.kernel.dtype == jnp.float32
  assert layer16.experts.wi.dtype == jnp.float32
  assert logits.dtype == jnp.float32
  y16, aux16 = layer16(x)
  y32, aux32 = layer32(x)
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  assert aux16.z_loss.dtype == jnp.float32
  # Same params, float32 routing: only the expert matmuls lose precision.
  np.testing.assert_allclose(aux16.aux_loss, aux32.aux_loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32,
                             atol=0.02 * float(jnp.abs(y32).max()))


def test_router_dtype_bfloat16_ablation():
  layer = _layer(router_dtype=jnp.bfloat16)
  logits, _ = layer.router(dispatch_lib.group_tokens(_x(), 8))
  assert logits.dtype == jnp.bfloat16
  y, aux = layer(_x())
  assert y.dtype == jnp.float32 and np.isfinite(float(aux.aux_loss))


def test_router_jitter_only_in_training():
  eps = 0.1
  router = moe.Router(M, M, jitter=eps, rngs=nnx.Rngs(0))
  router.kernel[...] = jnp.eye(M)  # logits = jittered input
  x = jnp.abs(_x()) + 0.5
  logits, noise = router(x)
  assert noise is None
  ratio = np.asarray(logits / x)
  assert ratio.min() >= 1 - eps - 1e-6 and ratio.max() <= 1 + eps + 1e-6
  assert ratio.std() > eps / 10  # actually multiplied by U(1-eps, 1+eps)
  logits2, _ = router(x)
  assert not np.allclose(logits, logits2)  # fresh noise each call
  router.eval()
  np.testing.assert_array_equal(router(x)[0], x)


def test_noise_dropout_and_random_policy_off_in_eval():
  for kw in (dict(router="noisy_topk", num_selected=2),
             dict(router="gshard", second_expert_policy="random"),
             dict(expert_dropout=0.5), dict(router_jitter=0.5)):
    # A peaked router (std 1) so that policy 'random' drops second choices.
    layer = _layer(train_capacity_factor=2.0, router_init_std=1.0, **kw)
    x = _x()
    y1, _ = layer(x)
    y2, _ = layer(x)
    assert not np.allclose(y1, y2), kw  # training draws fresh randomness
    layer.eval()
    e1, _ = layer(x)
    e2, _ = layer(x)
    np.testing.assert_array_equal(e1, e2)


def test_expert_dropout_is_inverted_dropout_on_hidden():
  experts = experts_lib.Experts(1, M, H, dropout=0.5, rngs=nnx.Rngs(0))
  experts.wo[...] = jnp.eye(H, M)[None]  # output = first M hidden units
  buf = jnp.abs(jax.random.normal(jax.random.key(3), (1, 2, 64, M))) + 0.1
  out = np.asarray(experts(buf))
  clean = np.asarray(experts(buf, deterministic=True))
  kept = out != 0
  assert np.all(clean[kept] != 0)  # relu zeros stay zero
  assert 0.35 < kept.sum() / (clean != 0).sum() < 0.65
  np.testing.assert_allclose(out[kept], 2.0 * clean[kept], rtol=1e-6)


def test_rng_streams():
  kw = dict(router="gshard", second_expert_policy="random", expert_dropout=0.1,
            router_jitter=0.1)
  x = _x()

  def out(eval_mode=False, layer_kw=kw, **seeds):
    layer = _layer(rngs=nnx.Rngs(params=0, **seeds), **layer_kw)
    if eval_mode:
      layer.eval()
    return np.asarray(layer(x)[0])

  ref = out(dropout=1, router=2)
  # The same seeds draw the same numbers.
  np.testing.assert_array_equal(out(dropout=1, router=2), ref)
  # Each stream is used: the router seed (jitter, the random second expert)
  # and the dropout seed (expert dropout) each change the output.
  assert not np.allclose(out(dropout=1, router=3), ref)
  assert not np.allclose(out(dropout=2, router=2), ref)
  # ...and only its own: without expert dropout, the dropout seed is unused.
  no_dropout = dict(kw, expert_dropout=0.0)
  np.testing.assert_array_equal(out(layer_kw=no_dropout, dropout=1, router=2),
                                out(layer_kw=no_dropout, dropout=2, router=2))
  # Without a 'router' stream the router draws from 'dropout'.
  assert not np.allclose(out(layer_kw=no_dropout, dropout=1),
                         out(layer_kw=no_dropout, dropout=2))
  # A plain Rngs(0) serves every stream.
  y, _ = _layer(rngs=nnx.Rngs(0), **kw)(x)
  assert np.all(np.isfinite(y))
  # Eval mode draws nothing: any seeds give the same output.
  np.testing.assert_array_equal(out(True, dropout=1, router=2),
                                out(True, dropout=2, router=3))
  # Deterministic layers need only params.
  _layer(rngs=nnx.Rngs(params=0))(x)
  with pytest.raises(ValueError, match="dropout"):
    _layer(rngs=nnx.Rngs(params=0), expert_dropout=0.1)
  with pytest.raises(ValueError, match="rng stream"):
    _layer(rngs=nnx.Rngs(params=0), router="noisy_topk", num_selected=2)


@pytest.mark.parametrize("activation", ["relu", "gated_gelu"])
def test_single_expert_layer_equals_mlp_block(activation):
  x = _x()
  mlp = experts_lib.MlpBlock(M, H, activation=activation, rngs=nnx.Rngs(1))
  layer = _layer(num_experts=1, activation=activation, train_capacity_factor=1.0)
  assert layer.capacity(8) == 8  # C = S: nothing dropped
  names = ("wi_0", "wi_1", "wo") if activation == "gated_gelu" else ("wi", "wo")
  for name in names:
    getattr(layer.experts, name)[...] = getattr(mlp, name)[...][None]
  y, aux = layer(x)
  np.testing.assert_allclose(y, mlp(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux.aux_loss, 1.0, rtol=1e-6)  # E * f * P = 1


def test_init_scales():
  init_scale = 0.1
  experts = experts_lib.Experts(4, 64, 256, init_scale=init_scale, rngs=nnx.Rngs(0))
  for w, fan_in in ((experts.wi[...], 64), (experts.wo[...], 256)):
    std = math.sqrt(init_scale / fan_in)
    assert abs(float(jnp.std(w)) / std - 1) < 0.05
    # Truncated at 2 std of the underlying normal.
    assert float(jnp.abs(w).max()) <= 2 * std / 0.87962566 + 1e-6
  # The dense FFN has the same per-matrix std (no expert axis to skip).
  mlp = experts_lib.MlpBlock(64, 256, init_scale=init_scale, rngs=nnx.Rngs(0))
  for w, fan_in in ((mlp.wi[...], 64), (mlp.wo[...], 256)):
    assert abs(float(jnp.std(w)) / math.sqrt(init_scale / fan_in) - 1) < 0.05
  router = moe.Router(64, 256, init_std=0.02, rngs=nnx.Rngs(0))
  assert abs(float(jnp.std(router.kernel[...])) / 0.02 - 1) < 0.05


def test_group_size_must_divide_tokens():
  layer = _layer(group_size=16)
  with pytest.raises(ValueError, match=r"group_size=16.*B\*L=2\*12=24"):
    layer(_x(b=2, l=12))
  # group_size larger than B*L: one group of all tokens.
  assert dispatch_lib.group_tokens(_x(b=2, l=12), 1024).shape == (1, 24, M)
  assert dispatch_lib.group_tokens(_x(b=2, l=12), 6).shape == (4, 6, M)


def test_bad_arguments():
  with pytest.raises(ValueError, match="router"):
    _layer(router="top3")
  with pytest.raises(ValueError, match="dispatch"):
    _layer(dispatch="scatter")
  with pytest.raises(ValueError, match="activation"):
    _layer(activation="swish")
  with pytest.raises(ValueError, match="num_selected"):
    _layer(router="topk", num_selected=5)
  with pytest.raises(ValueError, match=r"\[B, L, M=8\]"):
    _layer()(_x(m=6))


def test_nnx_jit_matches_eager():
  layer = _layer(router="topk", num_selected=2, train_capacity_factor=0.5)
  x = _x()
  y_eager, aux_eager = layer(x)

  @nnx.jit
  def call(layer, x):
    return layer(x)

  y_jit, aux_jit = call(layer, x)
  np.testing.assert_allclose(y_jit, y_eager, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux_jit.metrics.dropped_fraction,
                             aux_eager.metrics.dropped_fraction)
  layer.eval()  # static attribute change retraces with the eval capacity
  y_eval, aux_eval = call(layer, x)
  assert float(aux_eval.metrics.dropped_fraction) < float(
      aux_jit.metrics.dropped_fraction)
