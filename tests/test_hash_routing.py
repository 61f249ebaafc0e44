"""Hash routing (Roller et al. 2021): the fixed id -> expert table, slots by
hand, the layer against a per-token reference, and a model that trains."""
import numpy as np
import pytest
from flax import nnx
import jax

from switchjax import hash_router
from switchjax import moe as moe_lib
from switchjax import routing
from switchjax import train
from switchjax import validate

from conftest import experiment
from test_train import read_metrics, short


def test_hash_top1_by_hand():
  # Experts 0, 1, 1, 1 with capacity 2: the fourth token finds expert 1 full.
  r = routing.hash_top1(np.array([[0, 1, 1, 1]]), num_experts=2, capacity=2)
  np.testing.assert_array_equal(r.token_index[0], [[0, 4], [1, 2]])
  np.testing.assert_array_equal(r.slot_weight[0], [[1, 0], [1, 1]])
  np.testing.assert_allclose(float(r.metrics.dropped_fraction), 0.25)
  assert float(r.aux_loss) == 0.0
  assert float(r.metrics.router_confidence) == 1.0


def test_table_is_fixed_and_uniform():
  table = hash_router.expert_table(32000, 8)
  assert table is hash_router.expert_table(32000, 8)  # cached, fixed
  np.testing.assert_array_equal(
      table, np.random.default_rng(0).integers(0, 8, 32000))
  counts = np.bincount(table, minlength=8)
  # Binomial(32000, 1/8): sd 59; every expert within 5 sd of 4000.
  assert np.all(np.abs(counts - 4000) < 5 * 59), counts


def _layer(**kw):
  return moe_lib.MoeLayer(8, 16, num_experts=4, router="hash", vocab_size=50,
                          activation="relu", group_size=6, expert_impl="batched",
                          init_scale=1.0, rngs=nnx.Rngs(0), **kw)


def test_layer_sends_each_token_to_its_ids_expert():
  layer = _layer(expert_capacity=6)  # room for every token
  assert "router" not in {p[0] for p, _ in
                          nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  ids = np.random.default_rng(1).integers(0, 50, (2, 6))
  y, aux = layer(x, ids)
  table = hash_router.expert_table(50, 4)
  wi, wo = np.asarray(layer.experts.wi[...]), np.asarray(layer.experts.wo[...])
  want = np.zeros((2, 6, 8))
  for b in range(2):
    for t in range(6):
      e = table[ids[b, t]]
      want[b, t] = np.maximum(np.asarray(x)[b, t] @ wi[e], 0) @ wo[e]
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  assert float(aux.z_loss) == 0.0 and float(aux.aux_loss) == 0.0
  load = np.bincount(table[ids].reshape(-1), minlength=4) / 12
  np.testing.assert_allclose(np.asarray(aux.metrics.expert_load), load,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="needs the token ids"):
    layer(x)


def test_decoder_only_hash_model_trains(tmp_path):
  c = short(experiment("switch_base", "tiny"), steps=2)
  c.model.arch, c.moe.router = "decoder_only", "hash"
  workdir = str(tmp_path / "hash")
  train.train_and_evaluate(validate.prepare(c), workdir)
  rows = read_metrics(workdir)
  assert rows and all(np.isfinite(r["loss"]) for r in rows)
  assert all(r["z_loss"] == 0.0 and r["aux_loss"] == 0.0 for r in rows)
