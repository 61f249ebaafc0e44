"""Meshes, logical axis rules and expert parallelism on 8 host CPU devices.

The reference for every sharded computation is the same function on one
device: forward values, gradients, losses and updated parameters must match.
"""
import os
import re

from flax import nnx
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from switchjax import checkpoint as ckpt_lib
from switchjax import moe
from switchjax import optim
from switchjax import partitioning
from switchjax import train
from switchjax import validate

from conftest import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("gspmd", "shard_map")


def mesh_config(data, expert, model=1, num_experts=8):
  return ml_collections.ConfigDict({
      "mesh": {"data": data, "expert": expert, "model": model},
      "moe": {"num_experts": num_experts}})


def tiny_config(path="gspmd", data=1, expert=1, model=1):
  """Switch-Base tiny, shrunk to one sparse decoder-only layer (compile time).

  8 x 32 tokens in 8 groups of 32, 8 experts. Dropout and router jitter stay
  on: their draws must not depend on the mesh.
  """
  c = experiment("switch_base")
  c.model.arch = "decoder_only"
  c.model.vocab_size = 128
  c.model.d_model, c.model.num_heads, c.model.head_dim = 32, 2, 16
  c.model.d_ff = 64
  c.model.num_decoder_layers = 1
  c.moe.sparse_every = 1
  c.moe.group_size = 32
  c.data.seq_length = 32
  c.train.batch_size = 8
  c.train.warmup_steps = 1
  c.moe.expert_parallel = path
  c.mesh.data, c.mesh.expert, c.mesh.model = data, expert, model
  return c


def batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, length = config.train.batch_size, config.data.seq_length
  tokens = rng.integers(1, config.model.vocab_size, (b, length + 1))
  return {
      "decoder_input_tokens": tokens[:, :-1].astype(np.int32),
      "decoder_target_tokens": tokens[:, 1:].astype(np.int32),
      "decoder_loss_weights": np.ones((b, length), np.float32),
  }


# ---------------------------------------------------------------------------
# Meshes and rules.


def test_mesh_shapes_and_bad_meshes():
  assert partitioning.check_mesh(mesh_config(-1, 4), 8) == (2, 4, 1)
  assert partitioning.check_mesh(mesh_config(1, -1, 2), 8) == (1, 4, 2)
  mesh = partitioning.make_mesh(mesh_config(2, 4))
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  one = partitioning.make_mesh(mesh_config(1, 1), jax.devices()[:1])
  assert one.devices.size == 1
  with pytest.raises(ValueError, match="needs 16 devices, but 8"):
    partitioning.check_mesh(mesh_config(4, 4), 8)
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    partitioning.check_mesh(mesh_config(-1, 3), 8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    partitioning.check_mesh(mesh_config(-1, -1), 8)
  with pytest.raises(ValueError, match=r"num_experts=6 is not divisible .*\(4\)"):
    partitioning.check_mesh(mesh_config(2, 4, num_experts=6), 8)
  # The run refuses them before any work, naming the key.
  c = tiny_config(data=2, expert=4)
  c.moe.num_experts = 6
  with pytest.raises(validate.ConfigError, match="not divisible by the mesh"):
    validate.prepare(c)
  c = tiny_config(data=4, expert=4)
  with pytest.raises(validate.ConfigError, match="needs 16 devices"):
    validate.prepare(c)


def test_logical_to_spec_rules():
  mesh = partitioning.make_mesh(mesh_config(2, 2, 2))
  rules = partitioning.DEFAULT_RULES
  spec = partitioning.logical_to_spec
  assert spec(("batch", "length"), (8, 4), mesh, rules) == P(("data", "expert"))
  assert spec(("expert", "embed", "expert_mlp"), (8, 4, 6), mesh,
              rules) == P("expert", None, "model")
  # A dimension keeps only the axes that divide it: 2 | 6 but 4 does not.
  assert spec(("batch",), (6,), mesh, rules) == P("data")
  assert spec(("heads", "kv"), (3, 4), mesh, rules) == P()
  # A mesh axis serves one dimension of an array, the first that asks.
  assert spec(("mlp", "heads"), (4, 4), mesh, rules) == P("model")
  with pytest.raises(ValueError, match="no partitioning rule .*'bogus'"):
    spec(("bogus",), (4,), mesh, rules)
  with pytest.raises(ValueError, match=r"rules.mlp: unknown mesh axes \['tensor'\]"):
    partitioning.parse_rules({"mlp": "tensor"})
  # Rules are config: model parallelism over the embedding instead.
  c = tiny_config()
  c.partitioning.rules.embed = "model"
  c.partitioning.rules.mlp = ""
  rules = partitioning.rules_from_config(c)
  assert spec(("embed", "mlp"), (4, 4), mesh, rules) == P("model")


def _abstract_state(config, mesh):
  trainer_state = jax.eval_shape(
      train._init_fn(config, optim.make_optimizer(config)))
  return trainer_state, partitioning.state_specs(
      trainer_state, mesh, partitioning.rules_from_config(config))


def _by_path(tree):
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, P))[0]
  return {jax.tree_util.keystr(p): x for p, x in flat}


def test_every_param_and_optimizer_leaf_gets_its_sharding():
  c = tiny_config()
  c.model.d_model, c.model.d_ff = 128, 256  # Adafactor factors dims >= 128
  mesh = partitioning.make_mesh(mesh_config(2, 2, 2))
  state, specs = _abstract_state(c, mesh)
  flat = jax.tree_util.tree_flatten_with_path(
      state["params"], is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, v in flat:  # every parameter is named, one name per axis
    names = partitioning.variable_names(v)
    assert names is not None and len(names) == v.ndim, jax.tree_util.keystr(path)
  s = _by_path(specs)
  enc = "['params']['decoder']['layers'][0]"
  assert s[f"{enc}['mlp']['experts']['wi_0'].value"] == P("expert", None, "model")
  assert s[f"{enc}['mlp']['experts']['wo'].value"] == P("expert", "model")
  assert s[f"{enc}['mlp']['router']['kernel'].value"] == P()
  assert s[f"{enc}['self_attention']['query'].value"] == P(None, "model")
  assert s["['params']['embedding'].value"] == P("model")
  # Adafactor keeps per-expert statistics [E, M], [E, H] and counts [E]: they
  # live with their experts.
  params = jax.tree_util.tree_flatten_with_path(
      state["params"], is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  index = [jax.tree_util.keystr(p) for p, _ in params].index(
      f"{enc[len('[params]') + 2:]}['mlp']['experts']['wi_0']")
  stats = state["opt_state"][0].leaves[index][0]
  assert stats.v_row.shape == (8, 128) and stats.v_col.shape == (8, 256)
  spec_stats = specs["opt_state"][0].leaves[index][0]
  assert spec_stats.v_row == P("expert") and spec_stats.v_col == P("expert")
  assert spec_stats.count == P("expert")
  # AdamW's moments mirror the params, and are placed like them.
  c.train.optimizer = "adamw"
  _, specs = _abstract_state(c, mesh)
  s = _by_path(specs)
  assert s[f"['opt_state'][0].mu{enc[len('[params]') + 2:]}['mlp']['experts']['wi_0'].value"] == P(
      "expert", None, "model")


# ---------------------------------------------------------------------------
# The MoE layer: sharded forward and gradients equal one device's.


def _moe_loss_and_grads(layer, x, cotangent, mesh=None):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def f(params, rest, x):
    model = nnx.merge(graphdef, params, rest)

    def loss_fn(model, x):
      y, aux = model(x)
      loss = jnp.sum(y * cotangent) + aux.aux_loss + aux.z_loss
      return loss, (y, aux.aux_loss)
    (loss, (y, aux)), grads = nnx.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(model, x)
    return loss, y, aux, grads

  if mesh is None:
    return jax.jit(f)(params, rest, x)
  rules = partitioning.DEFAULT_RULES
  fn = jax.jit(partitioning.in_mesh(f, mesh, rules), in_shardings=(
      partitioning.state_shardings(params, mesh, rules),
      partitioning.replicated(mesh), partitioning.batch_sharding(mesh, rules)))
  return fn(params, rest, x)


MOE_CASES = [
    # (path, (data, expert, model), group size, router, dispatch); 256 tokens.
    # (both paths on 2 x 4 are in the tiny model test below)
    ("gspmd", (1, 8, 1), 32, "switch", "gather"),
    ("shard_map", (1, 8, 1), 32, "gshard", "einsum"),
    ("gspmd", (2, 2, 2), 32, "expert_choice", "gather"),
    ("shard_map", (2, 2, 2), 32, "expert_choice", "gather"),
    # 2 groups on 8 devices: groups replicated over 'expert', summed combine.
    ("shard_map", (2, 4, 1), 128, "gshard", "gather"),
]


@pytest.mark.parametrize("path,shape,group_size,router,dispatch", MOE_CASES)
def test_moe_layer_sharded_matches_one_device(path, shape, group_size, router,
                                               dispatch):
  m, h, e = 16, 32, 8
  layer = moe.MoeLayer(
      m, h, num_experts=e, group_size=group_size, min_capacity=1, router=router,
      activation="gated_gelu", expert_dropout=0.2, router_jitter=0.1,
      dispatch=dispatch, expert_parallel=path, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, 16, m))
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  want = _moe_loss_and_grads(layer, x, cotangent)
  mesh = partitioning.make_mesh(mesh_config(*shape))
  got = _moe_loss_and_grads(layer, x, cotangent, mesh)
  for name, a, b in zip(("loss", "y", "aux_loss", "grads"), want, got):
    jax.tree.map(lambda u, v, name=name: np.testing.assert_allclose(
        np.asarray(v), np.asarray(u), rtol=1e-5, atol=1e-6, err_msg=name), a, b)
  # The expert weights' gradient is the full one: not divided by the number
  # of expert shards, nor by the number of data replicas.
  g_experts = got[3][0]["experts"]["wo"][...]
  assert g_experts.sharding.spec[0] == "expert"
  assert float(jnp.abs(g_experts).sum()) > 0


# ---------------------------------------------------------------------------
# A tiny model: train steps on a mesh equal those on one device.


def _train(config, steps=2, devices=None):
  """(trainer, state, losses, compiled HLO text) after `steps` train steps."""
  trainer = train.make_trainer(config, devices)
  state = trainer.init_state()
  first = train._global_batch(trainer, batch(config))
  compiled = trainer._jit_train.lower(
      state, trainer.rng_state, trainer.base_key, first).compile()
  losses = []
  for i in range(steps):
    global_batch = train._global_batch(trainer, batch(config, seed=i))
    state, metrics = compiled(state, trainer.rng_state, trainer.base_key,
                              global_batch)
    losses.append(float(metrics["loss"]))
  return trainer, state, losses, compiled.as_text()


@pytest.fixture(scope="module")
def one_device_run():
  return _train(tiny_config(), devices=jax.devices()[:1])


def _expert_shapes(params):
  return {tuple(v.shape) for v in jax.tree.leaves(params)
          if v.ndim == 3 and v.shape[0] == 8}


def _all_gather_shapes(hlo):
  return [tuple(int(d) for d in dims.split(",") if d) for dims in
          re.findall(r"= f32\[([\d,]*)\][^=\n]*? all-gather\(", hlo)]


@pytest.mark.parametrize("path,shape", [
    ("gspmd", (2, 4, 1)), ("shard_map", (2, 4, 1)), ("shard_map", (1, 4, 2))])
def test_tiny_model_train_steps_match_one_device(one_device_run, path, shape):
  _, want_state, want_losses, _ = one_device_run
  trainer, state, losses, hlo = _train(tiny_config(path, *shape))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6),
      want_state["params"], state["params"])
  wi = state["params"]["decoder"]["layers"][0]["mlp"]["experts"]["wi_0"][...]
  assert wi.sharding.spec == partitioning.logical_to_spec(
      ("expert", "embed", "expert_mlp"), wi.shape, trainer.mesh)
  # XLA moves tokens (all-to-all), never the expert weights (all-gather).
  assert "all-to-all(" in hlo
  gathered = _all_gather_shapes(hlo)
  assert not _expert_shapes(state["params"]) & set(gathered), gathered


# ---------------------------------------------------------------------------
# Checkpoints move between meshes.


def test_checkpoint_restores_on_other_meshes(tmp_path):
  config = tiny_config(data=2, expert=4)
  trainer = train.make_trainer(config)
  state = trainer.init_state()
  # Optimizer statistics that differ per expert, not only zeros.
  state = jax.jit(lambda s: jax.tree.map(
      lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, s),
      out_shardings=trainer.state_shardings)(state)
  saved = jax.device_get(state)
  data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1, log=None)
  ckpt.save(1, state, data_iter)
  ckpt.close()

  for shape, devices in (((4, 2, 1), None), ((1, 1, 1), jax.devices()[:1])):
    other = train.make_trainer(tiny_config(*((("gspmd",) + shape))), devices)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1, log=None)
    restored = ckpt.restore(1, other.abstract_state,
                            iter(grain.MapDataset.range(4).to_iter_dataset()))
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(restored))
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or
                 pytest.fail(f"{x.sharding} != {s}"),
                 restored, other.state_shardings)
    # Every expert in its place: the shard holding experts [a, b) holds
    # exactly the saved experts a..b-1.
    wi = restored["params"]["decoder"]["layers"][0]["mlp"]["experts"]["wi_0"][...]
    want = saved["params"]["decoder"]["layers"][0]["mlp"]["experts"]["wi_0"]
    for shard in wi.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    assert {s.data.shape[0] for s in wi.addressable_shards} == {8 // shape[1]}
