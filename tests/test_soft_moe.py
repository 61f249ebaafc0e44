"""Soft MoE against a NumPy transcription of the paper's Algorithm 1, its
token-permutation property, and the configs that build or refuse it."""
import numpy as np
import pytest
from flax import nnx
import jax

from switchjax import model as model_lib
from switchjax import soft_moe
from switchjax import train
from switchjax import validate

from conftest import experiment
from test_train import read_metrics, short


def _softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def _reference(layer, x, group):
  """Puigcerver et al. 2023, Algorithm 1, per group, in float64 NumPy."""
  phi = np.asarray(layer.router.kernel[...], np.float64)
  wi = np.asarray(layer.experts.wi[...], np.float64)  # [E, M, H]
  wo = np.asarray(layer.experts.wo[...], np.float64)  # [E, H, M]
  e, c = layer.num_experts, layer.slots_per_expert
  tokens = np.asarray(x, np.float64).reshape(-1, group, x.shape[-1])
  out = []
  for xg in tokens:  # [S, M]
    logits = xg @ phi  # [S, E * C]
    d = _softmax(logits, axis=0)  # each slot: weights over tokens
    w = _softmax(logits, axis=1)  # each token: weights over slots
    slots = (d.T @ xg).reshape(e, c, -1)  # [E, C, M]
    ys = np.stack([np.maximum(slots[i] @ wi[i], 0) @ wo[i] for i in range(e)])
    out.append(w @ ys.reshape(e * c, -1))
  return np.concatenate(out).reshape(x.shape)


def _layer(impl="batched", **kw):
  args = dict(num_experts=4, slots_per_expert=2, group_size=6,
              activation="relu", expert_impl=impl, init_scale=1.0,
              router_init_std=0.5)
  args.update(kw)
  return soft_moe.SoftMoeLayer(8, 16, rngs=nnx.Rngs(0), **args)


@pytest.mark.parametrize("impl", ["batched", "loop"])
def test_matches_algorithm_1(impl):
  layer = _layer(impl)
  x = jax.random.normal(jax.random.key(1), (2, 6, 8))
  y, aux = layer(x)
  np.testing.assert_allclose(np.asarray(y), _reference(layer, x, 6),
                             rtol=1e-5, atol=1e-5)
  assert float(aux.aux_loss) == 0.0
  assert float(aux.metrics.dropped_fraction) == 0.0
  load = np.asarray(aux.metrics.expert_load)
  assert load.shape == (4,) and abs(load.sum() - 1.0) < 1e-5


def test_permuting_tokens_permutes_outputs():
  """Slots are sums over the group, so token order does not matter."""
  layer = _layer(group_size=0)
  x = jax.random.normal(jax.random.key(2), (1, 6, 8))
  perm = np.array([3, 0, 5, 1, 4, 2])
  y, _ = layer(x)
  y_perm, _ = layer(x[:, perm])
  np.testing.assert_allclose(np.asarray(y_perm), np.asarray(y)[:, perm],
                             rtol=1e-5, atol=1e-6)


def test_normalized_logits_ignore_the_input_scale():
  layer = _layer(normalize=True)
  x = jax.random.normal(jax.random.key(3), (1, 6, 8))
  np.testing.assert_allclose(np.asarray(layer.router(x)),
                             np.asarray(layer.router(3.0 * x)), rtol=1e-5)
  assert layer.router.scale[...].shape == ()


def _soft_config(**moe):
  c = short(experiment("switch_base", "tiny"), steps=2)
  c.moe.encoder_router = "soft"
  for k, v in moe.items():
    c.moe[k] = v
  return c


def test_decoder_refuses_soft_in_one_line():
  c = _soft_config(decoder_router="soft")
  with pytest.raises(validate.ConfigError, match="each slot mixes every token"):
    validate.prepare(c)
  c = _soft_config(expert_parallel="shard_map")
  with pytest.raises(validate.ConfigError, match="'soft' runs with"):
    validate.prepare(c)


def test_encoder_soft_moe_trains_and_counts_its_slots(tmp_path):
  c = validate.prepare(_soft_config(slots_per_expert=2))
  model = model_lib.build_model(c, rngs=nnx.Rngs(0))
  sparse = [l for l in model.encoder.layers if l.sparse]
  assert sparse and all(isinstance(l.mlp, soft_moe.SoftMoeLayer)
                        for l in sparse)
  # Against the same model with Switch's router in the encoder: Phi is
  # [M, E * 2] instead of [M, E], and a token's share of the experts is
  # E * C / S of one expert (the slots of its group) instead of K = 1.
  c_switch = validate.prepare(short(experiment("switch_base", "tiny"), steps=2))
  (total, active), (total_sw, active_sw) = (
      model_lib.param_counts(c), model_lib.param_counts(c_switch))
  e, m, n = c.moe.num_experts, c.model.d_model, len(sparse)
  experts = sum(np.prod(p.shape) for p in jax.tree.leaves(
      nnx.state(sparse[0].mlp.experts, nnx.Param)))
  assert total - total_sw == n * m * e
  want = n * m * e + n * experts * (2 / c.moe.group_size - 1 / e)
  assert active - active_sw == pytest.approx(want, abs=1)
  workdir = str(tmp_path / "soft")
  train.train_and_evaluate(c, workdir)
  rows = read_metrics(workdir)
  assert rows and all(np.isfinite(r["loss"]) for r in rows)
