"""The speed paths compute the same function as the references.

Experts as one batched einsum vs a loop over experts; dropless (ragged_dot)
dispatch vs the einsum reference; remat; no large float32 tensors in bfloat16
layers; memory that does not grow with S x E x C; the per-layer param count.
"""
import math

from flax import nnx
import jax
import jax.extend
import jax.numpy as jnp
from jax.sharding import AxisType
import numpy as np
import pytest

from switchjax import config_base
from switchjax import dropless
from switchjax import model as model_lib
from switchjax import experts as experts_lib
from switchjax import moe

M, H, E = 8, 16, 4


def _x(b=2, l=16, m=M, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (b, l, m)).astype(dtype)


def _layer(**kw):
  args = dict(num_experts=E, group_size=8, min_capacity=1, rngs=nnx.Rngs(0))
  args.update(kw)
  return moe.MoeLayer(M, H, **args)


def _grads(module, x, cotangent):
  """(y, aux or None, param grads as {path: array}, input grad), jitted."""
  def loss_fn(module, x):
    out = module(x)
    y, aux = out if isinstance(out, tuple) else (out, None)
    extra = 0.0 if aux is None else aux.aux_loss + aux.z_loss
    return jnp.sum(y.astype(jnp.float32) * cotangent) + extra, (y, aux)

  @nnx.jit
  def run(module, x):
    (g_module, g_x), (y, aux) = nnx.grad(
        loss_fn, argnums=(0, 1), has_aux=True)(module, x)
    return y, aux, g_module, g_x

  y, aux, g_module, g_x = run(module, x)
  flat = {jax.tree_util.keystr(p): v
          for p, v in jax.tree_util.tree_leaves_with_path(g_module)}
  return y, aux, flat, g_x


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
  y_a, aux_a, g_a, gx_a = a
  y_b, aux_b, g_b, gx_b = b
  np.testing.assert_allclose(y_a, y_b, rtol=rtol, atol=atol)
  np.testing.assert_allclose(gx_a, gx_b, rtol=rtol, atol=atol)
  assert g_a.keys() == g_b.keys()
  for k in g_a:
    np.testing.assert_allclose(g_a[k], g_b[k], rtol=rtol, atol=atol, err_msg=k)
  if aux_a is not None:
    np.testing.assert_allclose(aux_a.aux_loss, aux_b.aux_loss, rtol=1e-6)
    np.testing.assert_allclose(aux_a.metrics.dropped_fraction,
                               aux_b.metrics.dropped_fraction)


def _as_float32(result):
  """A `_grads` result (y, None, param grads, input grad) in float32."""
  y, aux, grads, gx = result
  f32 = lambda a: np.asarray(a, np.float32)
  return f32(y), aux, {k: f32(v) for k, v in grads.items()}, f32(gx)


# --- Experts: batched einsum vs loop over experts ---------------------------

@pytest.mark.parametrize("activation", ["relu", "gated_gelu"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_loop_equals_batched(activation, dropout, dtype):
  # The loop's backward is hand-written (switchjax/expert_loop.py); the
  # batched einsum's is autodiff's.
  x = jax.random.normal(jax.random.key(0), (E, 2, 3, M)).astype(dtype)
  cot = jax.random.normal(jax.random.key(1), x.shape)
  results = []
  for impl in ("batched", "loop"):
    # Same seed: same weights and the same dropout stream.
    experts = experts_lib.Experts(E, M, H, activation=activation, dropout=dropout,
                          impl=impl, dtype=dtype, rngs=nnx.Rngs(0))
    assert experts.uses_loop() == (impl == "loop")
    results.append(_grads(experts, x, cot))
  assert results[1][2]["['wo'].value"].dtype == jnp.float32  # params' dtype
  if dtype == "float32":
    _assert_same(*results)
  else:  # bfloat16 roundings apart at most
    _assert_same(*map(_as_float32, results), rtol=2e-2, atol=2e-2)
  if dropout:  # the case really drops units: some hidden grads vanish
    batched = experts_lib.Experts(E, M, H, activation=activation, dropout=dropout,
                          impl="batched", rngs=nnx.Rngs(0))
    plain = experts_lib.Experts(E, M, H, activation=activation, impl="batched",
                        rngs=nnx.Rngs(0))
    assert not np.allclose(batched(x), plain(x))


def test_expert_impl_auto_and_bad_value():
  experts = experts_lib.Experts(E, M, H, rngs=nnx.Rngs(0))
  assert experts.impl == "auto"
  # On CPU without a mesh: the loop, which runs faster there.
  assert experts.uses_loop() == (jax.default_backend() == "cpu")
  # Experts split over devices: the batched einsum (a loop would gather them).
  mesh = jax.make_mesh((4, 2, 1), ("data", "expert", "model"),
                       axis_types=(AxisType.Auto,) * 3)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert not experts.uses_loop()
  data_only = jax.make_mesh((8, 1, 1), ("data", "expert", "model"),
                            axis_types=(AxisType.Auto,) * 3)
  with jax.sharding.use_abstract_mesh(data_only.abstract_mesh):
    assert experts.uses_loop() == (jax.default_backend() == "cpu")
  with pytest.raises(ValueError, match="expert impl"):
    experts_lib.Experts(E, M, H, impl="unrolled", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("router", ["switch", "expert_choice"])
def test_fast_loop_layer_equals_einsum_batched_reference(router):
  # cf 0.5: C = 1 slot per expert, so tokens are dropped in both.
  kw = dict(router=router, train_capacity_factor=0.5)
  x = _x()
  cot = jax.random.normal(jax.random.key(1), x.shape)
  fast = _grads(_layer(dispatch="gather", expert_impl="loop", **kw), x, cot)
  ref = _grads(_layer(dispatch="einsum", expert_impl="batched", **kw), x, cot)
  assert float(fast[1].metrics.dropped_fraction) > 0
  _assert_same(fast, ref)


# --- Dropless -----------------------------------------------------------------

DROPLESS_CASES = {
    "switch": dict(router="switch"),
    # Policy 'random' discards some second choices before any capacity.
    "gshard_random_gelu": dict(router="gshard", second_expert_policy="random",
                               activation="gated_gelu"),
    "top3_unnormalized": dict(router="topk", num_selected=3,
                              normalize_weights=False),
}


@pytest.mark.parametrize("case", sorted(DROPLESS_CASES))
def test_dropless_equals_einsum_when_nothing_is_dropped(case):
  # cf = E: C = S, so the reference drops nothing either.
  kw = dict(DROPLESS_CASES[case], train_capacity_factor=float(E))
  x = _x()
  cot = jax.random.normal(jax.random.key(1), x.shape)
  got = _grads(_layer(dispatch="dropless", **kw), x, cot)
  ref = _grads(_layer(dispatch="einsum", expert_impl="batched", **kw), x, cot)
  _assert_same(got, ref, rtol=1e-5, atol=1e-5)


def test_dropless_keeps_what_capacity_drops():
  """cf 0.5 drops tokens on the fast path; dropless equals a per-token reference."""
  x = _x()
  layer = _layer(dispatch="dropless", train_capacity_factor=0.5)
  capped = _layer(dispatch="gather", train_capacity_factor=0.5)
  y, aux = nnx.jit(lambda layer, x: layer(x))(layer, x)
  capped_aux = nnx.jit(lambda layer, x: layer(x))(capped, x)[1]
  assert float(capped_aux.metrics.dropped_fraction) > 0
  assert float(aux.metrics.dropped_fraction) == 0.0
  xt = np.asarray(x, np.float64).reshape(-1, M)
  logits = xt @ np.asarray(layer.router.kernel[...], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  wi = np.asarray(layer.experts.wi[...], np.float64)
  wo = np.asarray(layer.experts.wo[...], np.float64)
  want = np.stack([probs[t, e] * np.maximum(xt[t] @ wi[e], 0) @ wo[e]
                   for t, e in enumerate(probs.argmax(-1))])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, M), want,
                             rtol=1e-4, atol=1e-5)


def test_sort_by_expert():
  order, sizes = dropless.sort_by_expert(
      jnp.array([2, 0, 2, 1, 0, 3]), jnp.array([1, 1, 1, 1, 1, 0], bool), 4)
  # Stable: token order within an expert; the invalid choice (index 5) last.
  np.testing.assert_array_equal(order, [1, 4, 3, 0, 2, 5])
  np.testing.assert_array_equal(sizes, [2, 1, 2, 0])


def test_dropless_rejects_expert_choice():
  with pytest.raises(ValueError, match="dropless"):
    _layer(dispatch="dropless", router="expert_choice")


# --- Remat ------------------------------------------------------------------

def test_remat_of_the_layer_equals_plain():
  layer = _layer(router="gshard", train_capacity_factor=0.5)
  x = _x()
  cot = jax.random.normal(jax.random.key(1), x.shape)

  class Remat(nnx.Module):
    def __init__(self, inner):
      self.inner = inner

    def __call__(self, x):
      return nnx.remat(lambda m, x: m(x))(self.inner, x)

  plain = _grads(layer, x, cot)
  remat = _grads(Remat(layer), x, cot)
  remat = (remat[0], remat[1],
           {k.replace(".inner", "", 1).replace("['inner']", "", 1): v
            for k, v in remat[2].items()}, remat[3])
  _assert_same(plain, remat)


# --- bfloat16: nothing big in float32 outside the router ----------------------

@pytest.mark.parametrize("dispatch", ["gather", "dropless"])
def test_bfloat16_layer_has_no_float32_token_tensors_beyond_the_router(dispatch):
  layer = _layer(dispatch=dispatch, dtype=jnp.bfloat16,
                 train_capacity_factor=2.0)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = _x(dtype=jnp.bfloat16)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y.astype(jnp.float32)) + aux.aux_loss

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x)
  float32_dims = set()

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
        for v in eqn.invars + eqn.outvars:
          if v.aval.dtype == jnp.float32:
            float32_dims.add(v.aval.shape[-1])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  # Float32 matmuls are the router's (contracting or producing E columns,
  # or its input x, M) only: no expert matmul (H) runs in float32.
  assert H not in float32_dims, float32_dims


# --- Memory -----------------------------------------------------------------

def _temp_bytes(dispatch: str, group_size: int, tokens: int) -> int:
  m, h, e = 32, 64, 8
  layer = moe.MoeLayer(m, h, num_experts=e, group_size=group_size,
                       train_capacity_factor=1.0, dispatch=dispatch,
                       rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.ShapeDtypeStruct((tokens // 64, 64, m), jnp.float32)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y * y) + aux.aux_loss

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_fast_path_memory_does_not_grow_with_s_times_e_times_c():
  tokens, m = 1024, 32
  small, large = 64, 1024
  fast = (_temp_bytes("gather", large, tokens)
          - _temp_bytes("gather", small, tokens))
  einsum = (_temp_bytes("einsum", large, tokens)
            - _temp_bytes("einsum", small, tokens))
  # The one-hot [G, S, E, C] tensors hold tokens * S * cf entries in all:
  # 16x more at S=1024 than at S=64; the fast path's buffers are
  # [E, G, C, M] = tokens * cf * M whatever S, plus O(tokens) routing ints
  # (a sort of S entries per group).
  assert einsum >= tokens * (large - small) * 4 // 2
  assert fast <= 2 * tokens * m * 4, (fast, einsum)


# --- param_counts -------------------------------------------------------------

def _whole_model_total(config):
  """Reference: the total on the whole abstract model (slow for big configs)."""
  model = nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape)
             for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# Active = total minus, in each MoE layer, the (E - K) experts a token does
# not use. One expert here: gated GELU wi_0, wi_1 [M, H] and wo [H, M] with
# M = 32, H = 48 (no biases), of E = 6.
PER_EXPERT = 3 * 32 * 48


@pytest.mark.parametrize("arch,overrides,inactive", [
    # sparse_every 3: layer 2 of the 5 encoder and of the 4 decoder layers.
    # Encoder expert choice: cf = 1.5 experts per token; decoder switch: 1.
    ("encoder_decoder", dict(encoder_router="expert_choice", sparse_every=3),
     (6 - 1.5) * PER_EXPERT + (6 - 1) * PER_EXPERT),
    # Every layer sparse: 5 + 4 layers of top-3.
    ("encoder_decoder", dict(router="topk", num_selected=3, sparse_every=1),
     9 * (6 - 3) * PER_EXPERT),
    # Decoder layers 1 and 3 of 4, GShard's top-2.
    ("decoder_only", dict(router="gshard", sparse_every=2),
     2 * (6 - 2) * PER_EXPERT),
    ("encoder_decoder", dict(num_experts=0), 0),
])
def test_param_counts_per_layer_equals_whole_model(arch, overrides, inactive):
  c = config_base.base_config()
  c.model.update(arch=arch, vocab_size=512, d_model=32, num_heads=2,
                 head_dim=8, d_ff=48, num_encoder_layers=5,
                 num_decoder_layers=4, tie_embeddings=arch == "decoder_only")
  c.moe.update(dict(dict(num_experts=6, train_capacity_factor=1.5), **overrides))
  total, active = model_lib.param_counts(c)
  assert total == _whole_model_total(c)
  assert active == total - inactive
