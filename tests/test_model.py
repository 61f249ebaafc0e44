"""Tests for switchjax.model and switchjax.attention (tiny sizes, CPU)."""
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from switchjax import attention
from switchjax import experts as experts_lib
from switchjax import model as model_lib
from switchjax import moe as moe_lib
from switchjax.config_base import base_config

VOCAB = 64


def tiny_config(arch="encoder_decoder", num_experts=0, **moe):
  c = base_config()
  m = c.model
  m.arch = arch
  m.vocab_size, m.d_model, m.num_heads, m.head_dim, m.d_ff = VOCAB, 32, 2, 16, 64
  m.num_encoder_layers = m.num_decoder_layers = 2
  m.relative_attention_num_buckets, m.relative_attention_max_distance = 8, 16
  m.dtype = "float32"
  m.dropout_rate = 0.0
  c.moe.num_experts = num_experts
  c.moe.group_size = 16
  for k, v in moe.items():
    c.moe[k] = v
  return c


def build(config, seed=0):
  return model_lib.build_model(config, rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, *tokens):
  return model(*tokens)


def tokens(key, shape, low=1):
  return jax.random.randint(jax.random.key(key), shape, low, VOCAB)


# --- relative position buckets --------------------------------------------


def test_relative_position_bucket_matches_t5_formula_by_hand():
  # 32 buckets, max_distance 128. Bidirectional: 16 per direction, 8 exact;
  # n >= 8 -> 8 + floor(log(n / 8) / log(16) * 8), capped at 15; keys after
  # the query (rel > 0) add 16. E.g. n=20: log(2.5)/log(16)*8 = 2.64 -> 10;
  # n=100: log(12.5)/log(16)*8 = 7.29 -> 15.
  rel = jnp.array([0, -1, 1, -7, -8, -20, -100, -200, 20])
  got = attention.relative_position_bucket(rel, bidirectional=True,
                                           num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(got, [0, 1, 17, 7, 8, 10, 15, 15, 26])
  # Causal: 32 buckets, 16 exact; n >= 16 -> 16 + floor(log(n/16)/log(8)*16)
  # (n=20: 1.72 -> 17; n=100: 14.1 -> 30), capped at 31; future keys -> 0.
  rel = jnp.array([5, 0, -5, -15, -20, -100, -1000])
  got = attention.relative_position_bucket(rel, bidirectional=False,
                                           num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(got, [0, 0, 5, 15, 17, 30, 31])


# --- attention --------------------------------------------------------------


def test_attention_matches_numpy_reference_without_scaling():
  attn = attention.MultiHeadAttention(8, 2, 4, rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, 8)))
  kv = np.asarray(jax.random.normal(jax.random.key(2), (2, 3, 8)))
  mask = np.array(jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 5, 3)))
  mask[..., 0] = True  # every query sees something
  bias = np.asarray(jax.random.normal(jax.random.key(4), (1, 2, 5, 3)))
  got = attn(jnp.asarray(x), jnp.asarray(kv), mask=jnp.asarray(mask),
             bias=jnp.asarray(bias))

  wq, wk, wv, wo = (np.asarray(p[...]) for p in
                    (attn.query, attn.key, attn.value, attn.out))
  q = np.einsum("bqm,mnd->bnqd", x, wq)
  k = np.einsum("btm,mnd->bntd", kv, wk)
  v = np.einsum("btm,mnd->bntd", kv, wv)
  logits = q @ k.transpose(0, 1, 3, 2) + bias  # no 1/sqrt(d)
  logits = np.where(mask, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("bnqd,ndm->bqm", probs @ v, wo)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_inits_follow_scaled_truncated_normal():
  s = 0.1
  attn = attention.MultiHeadAttention(256, 4, 64, init_scale=s,
                                      rngs=nnx.Rngs(0))
  for param, std in ((attn.query, math.sqrt(s / (256 * 64))),
                     (attn.key, math.sqrt(s / 256)),
                     (attn.out, math.sqrt(s / 256))):
    w = np.asarray(param[...])
    assert abs(w.std() / std - 1) < 0.05
    assert np.abs(w).max() <= 2 * std / 0.8796 + 1e-6  # truncated at 2 sigma
  c = tiny_config()
  c.model.vocab_size, c.model.d_model, c.model.init_scale = 1024, 64, s
  model = build(c)
  assert abs(np.asarray(model.embedding[...]).std() / math.sqrt(s) - 1) < 0.05
  assert abs(np.asarray(model.head[...]).std() / math.sqrt(s / 64) - 1) < 0.05


# --- shapes -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("num_experts", [0, 4])
def test_output_shapes_and_aux(arch, num_experts):
  c = tiny_config(arch, num_experts)
  c.model.dtype = "bfloat16"  # logits still come out in float32
  model = build(c)
  dec = tokens(1, (2, 8))
  args = (tokens(0, (2, 16)), dec) if arch == "encoder_decoder" else (dec,)
  logits, aux = forward(model, *args)
  assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert aux.aux_loss.shape == () and aux.z_loss.shape == ()
  if num_experts == 0:
    assert aux.metrics is None and aux.layer_names == ()
    assert float(aux.aux_loss) == 0.0 and float(aux.z_loss) == 0.0
    return
  names = (("decoder/layer_1",) if arch == "decoder_only"
           else ("encoder/layer_1", "decoder/layer_1"))
  assert aux.layer_names == names
  n = len(names)
  assert aux.metrics.dropped_fraction.shape == (n,)
  assert aux.metrics.expert_load.shape == (n, 4)
  assert aux.metrics.router_confidence.shape == (n,)
  assert aux.metrics.router_entropy.shape == (n,)
  # Switch aux loss is E * sum f_e P_e >= ~1 (1 at perfect balance).
  assert float(aux.aux_loss) > 0.9


def test_tied_logits_are_embedding_transpose_scaled():
  # A tied model equals an untied one whose head is E^T * d_model^-0.5.
  c = tiny_config("decoder_only")
  c.model.num_decoder_layers = 1
  c.model.tie_embeddings = True
  tied = build(c)
  assert tied.head is None
  c.model.tie_embeddings = False
  untied = build(c, seed=1)
  nnx.update(untied, nnx.state(tied, nnx.Param))
  untied.head[...] = tied.embedding[...].T * 32 ** -0.5
  dec = tokens(1, (2, 8))
  np.testing.assert_allclose(forward(tied, dec)[0], forward(untied, dec)[0],
                             rtol=1e-5, atol=1e-5)


# --- masks ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_decoder_is_causal_dense(arch):
  model = build(tiny_config(arch))
  dec = tokens(1, (2, 8))
  dec2 = dec.at[:, 5].set(dec[:, 5] % (VOCAB - 1) + 1)
  prefix = (tokens(0, (2, 6)),) if arch == "encoder_decoder" else ()
  a, _ = forward(model, *prefix, dec)
  b, _ = forward(model, *prefix, dec2)
  np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max() > 1e-3


def test_sparse_decoder_is_causal_even_when_tokens_are_dropped():
  # One routing group per sequence (group_size = L): switch top-1 fills slots
  # in token order, so an earlier token's slot never depends on later ones,
  # even with a capacity small enough to drop tokens.
  c = tiny_config("decoder_only", 4, sparse_every=1, group_size=16,
                  eval_capacity_factor=0.5, min_capacity=1)
  model = build(c)
  model.eval()
  dec = tokens(1, (2, 16))
  dec2 = dec.at[:, 9].set(dec[:, 9] % (VOCAB - 1) + 1)
  a, aux = forward(model, dec)
  b, _ = forward(model, dec2)
  assert (np.asarray(aux.metrics.dropped_fraction) > 0).all()
  np.testing.assert_allclose(a[:, :9], b[:, :9], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(a[:, 9:] - b[:, 9:])).max() > 1e-3


def test_encoder_padding_is_masked():
  # Trailing pad tokens (id 0) change nothing: same logits as the unpadded input.
  model = build(tiny_config())
  enc, dec = tokens(0, (2, 5)), tokens(1, (2, 4))
  padded = jnp.concatenate([enc, jnp.zeros((2, 3), jnp.int32)], axis=1)
  a, _ = forward(model, enc, dec)
  b, _ = forward(model, padded, dec)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_packed_examples_match_separate_examples():
  model = build(tiny_config())
  ea, eb = tokens(0, (4,)), tokens(1, (3,))
  da, db = tokens(2, (3,)), tokens(3, (4,))
  # Unpacked reference: one example per row, zero-padded at the end.
  pad = lambda x, n: jnp.pad(x, (0, n - x.shape[0]))
  want, _ = forward(model, jnp.stack([pad(ea, 4), pad(eb, 4)]),
                    jnp.stack([pad(da, 4), pad(db, 4)]))

  def pack(x, y, length):
    n = length - x.shape[0] - y.shape[0]
    toks = jnp.concatenate([x, y, jnp.full((n,), 7, jnp.int32)])  # junk tail
    seg = jnp.array([1] * x.shape[0] + [2] * y.shape[0] + [0] * n)
    pos = jnp.array(list(range(x.shape[0])) + list(range(y.shape[0])) + [0] * n)
    return toks[None], seg[None], pos[None]

  enc, enc_seg, enc_pos = pack(ea, eb, 9)
  dec, dec_seg, dec_pos = pack(da, db, 8)
  got, _ = nnx.jit(lambda m: m(
      enc, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
      encoder_positions=enc_pos, decoder_positions=dec_pos))(model)
  np.testing.assert_allclose(got[0, :3], want[0, :3], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[0, 3:7], want[1, :4], rtol=1e-4, atol=1e-4)


# --- MoE placement and aux --------------------------------------------------


@pytest.mark.parametrize("sparse_every,want", [(1, [0, 1, 2, 3]), (2, [1, 3]),
                                               (3, [2])])
def test_moe_placement(sparse_every, want):
  c = tiny_config("decoder_only", 4, sparse_every=sparse_every)
  c.model.num_decoder_layers = 4
  model = nnx.eval_shape(lambda: build(c))
  sparse = [i for i, layer in enumerate(model.decoder.layers)
            if isinstance(layer.mlp, moe_lib.MoeLayer)]
  assert sparse == want
  assert all(isinstance(layer.mlp, experts_lib.MlpBlock)
             for i, layer in enumerate(model.decoder.layers) if i not in want)
  assert model.decoder.moe_layer_names == tuple(f"decoder/layer_{i}" for i in want)


def test_per_stack_router_and_expert_dim():
  c = tiny_config(num_experts=4, router="gshard", encoder_router="expert_choice",
                  d_ff=24)
  model = nnx.eval_shape(lambda: build(c))
  enc, dec = model.encoder.layers[1].mlp, model.decoder.layers[1].mlp
  assert (enc.router_name, dec.router_name) == ("expert_choice", "gshard")
  assert enc.experts.wi_0.shape == (4, 32, 24)  # moe.d_ff, not model.d_ff


def test_aux_loss_is_mean_over_moe_layers():
  c = tiny_config(num_experts=4, sparse_every=1, z_loss_coef=1e-3)
  model = build(c)
  recorded = []
  original = moe_lib.MoeLayer.__call__

  def recording_call(self, x, token_ids=None):
    y, out = original(self, x, token_ids)
    recorded.append(out)
    return y, out

  @nnx.jit
  def run(model, enc, dec):
    recorded.clear()
    _, aux = model(enc, dec)
    return aux, list(recorded)

  with mock.patch.object(moe_lib.MoeLayer, "__call__", recording_call):
    aux, layers = run(model, tokens(0, (2, 8)), tokens(1, (2, 8)))
  assert len(layers) == 4 and len(aux.layer_names) == 4
  losses = np.array([float(o.aux_loss) for o in layers])
  assert np.ptp(losses) > 0  # the layers really differ
  np.testing.assert_allclose(aux.aux_loss, losses.mean(), rtol=1e-6)
  np.testing.assert_allclose(
      aux.z_loss, np.mean([float(o.z_loss) for o in layers]), rtol=1e-6)
  for i, o in enumerate(layers):
    np.testing.assert_allclose(aux.metrics.expert_load[i], o.metrics.expert_load)
    np.testing.assert_allclose(aux.metrics.router_entropy[i],
                               o.metrics.router_entropy)


# --- config errors ----------------------------------------------------------


@pytest.mark.parametrize("arch,moe,match", [
    ("encoder_decoder", dict(router="expert_choice"), "decoder"),
    ("encoder_decoder", dict(decoder_router="expert_choice"), "decoder"),
    ("decoder_only", dict(router="expert_choice"), "decoder"),
    ("decoder_only", dict(batch_prioritized=True), "batch_prioritized"),
    ("encoder_decoder", dict(batch_prioritized=True), "batch_prioritized"),
])
def test_non_causal_routing_in_decoder_is_refused(arch, moe, match):
  with pytest.raises(ValueError, match=match):
    build(tiny_config(arch, 4, **moe))


def test_expert_choice_in_encoder_only_is_fine():
  c = tiny_config(num_experts=4, router="expert_choice", decoder_router="switch")
  model = nnx.eval_shape(lambda: build(c))
  assert model.encoder.layers[1].mlp.router_name == "expert_choice"


# --- parameter counts -------------------------------------------------------


def t5_base_dense_count(v=32128, m=768, nd=768, f=2048, layers=12, heads=12,
                        buckets=32):
  attn = 4 * m * nd
  mlp = 3 * m * f  # gated gelu: wi_0, wi_1, wo
  enc_layer = attn + mlp + 2 * m
  dec_layer = 2 * attn + mlp + 3 * m
  return (2 * v * m + layers * (enc_layer + dec_layer)
          + 2 * buckets * heads + 2 * m)


def test_param_counts_t5_1_1_base():
  total, active = model_lib.param_counts(base_config())
  assert total == active == t5_base_dense_count()
  assert 247e6 < total < 249e6  # T5.1.1 base: ~248M
  c = base_config()
  c.model.tie_embeddings = True
  assert model_lib.param_counts(c)[0] == t5_base_dense_count() - 32128 * 768


@pytest.mark.parametrize("router,encoder_router,k_enc,k_dec", [
    ("switch", "", 1, 1), ("gshard", "", 2, 2),
    ("switch", "expert_choice", 2.0, 1)])
def test_param_counts_sparse(router, encoder_router, k_enc, k_dec):
  # Smaller than T5-base (same formula) to keep the abstract build quick.
  e, m, f, layers = 8, 64, 128, 4
  c = base_config()
  c.model.update(vocab_size=1000, d_model=m, num_heads=4, head_dim=16, d_ff=f,
                 num_encoder_layers=layers, num_decoder_layers=layers)
  c.moe.num_experts, c.moe.router = e, router
  c.moe.encoder_router = encoder_router
  c.moe.train_capacity_factor = 2.0
  total, active = model_lib.param_counts(c)
  dense = t5_base_dense_count(v=1000, m=m, nd=m, f=f, layers=layers, heads=4)
  moe_layers_per_stack = layers // 2  # sparse_every = 2
  expert = 3 * m * f
  router_params = m * e
  want_total = dense + 2 * moe_layers_per_stack * ((e - 1) * expert + router_params)
  want_active = dense + moe_layers_per_stack * (
      (k_enc - 1) * expert + (k_dec - 1) * expert + 2 * router_params)
  assert total == want_total
  assert active == int(round(want_active))


# --- training step ----------------------------------------------------------


def loss_fn(model, enc, dec, targets):
  logits, aux = model(enc, dec)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return ce + 0.01 * aux.aux_loss + 1e-3 * aux.z_loss


@nnx.jit
def grad_step(model, enc, dec, targets):
  return nnx.value_and_grad(loss_fn)(model, enc, dec, targets)


def test_jit_grad_reaches_router_in_training_mode():
  # With remat: dropout and router-jitter rng streams advance inside nnx.remat.
  c = tiny_config(num_experts=4, sparse_every=1, router_jitter=0.01)
  c.model.num_encoder_layers = c.model.num_decoder_layers = 1
  c.model.dropout_rate = 0.1
  c.model.remat = "full"
  model = build(c)
  loss, grads = grad_step(model, tokens(0, (2, 8)), tokens(1, (2, 8)),
                          tokens(2, (2, 8)))
  assert np.isfinite(float(loss))
  for stack in ("encoder", "decoder"):
    mlp = getattr(grads, stack).layers[0].mlp
    g = np.asarray(mlp.router.kernel[...])
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    assert np.abs(np.asarray(mlp.experts.wo[...])).max() > 0
  assert np.abs(np.asarray(grads.embedding[...])).max() > 0


def test_remat_gives_same_loss_and_grads():
  c = tiny_config(num_experts=4, sparse_every=1)
  c.model.num_encoder_layers = c.model.num_decoder_layers = 1
  args = (tokens(0, (2, 8)), tokens(1, (2, 8)), tokens(2, (2, 8)))
  results = {}
  for remat in ("none", "full", "experts"):
    c.model.remat = remat
    model = build(c)
    model.eval()
    results[remat] = grad_step(model, *args)
  loss, grads = results.pop("none")
  for other_loss, other_grads in results.values():
    np.testing.assert_allclose(loss, other_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-6),
                 grads, other_grads)
