"""End-to-end training: every tiny experiment trains, and resume is exact."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from switchjax import losses
from switchjax import train
from switchjax import validate

from conftest import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def load(path, preset="tiny"):
  return experiment(path, preset)


def short(config, steps=3):
  """A few steps of a smaller model: compile time dominates these tests."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.d_model, c.model.num_heads, c.model.head_dim = 32, 2, 16
  c.model.d_ff = 64
  c.data.inputs_length, c.data.targets_length, c.data.seq_length = 64, 16, 64
  c.train.batch_size = 8
  c.moe.group_size = 64
  c.train.num_steps = steps
  if c.train.schedule == "cosine":  # it decays to 0 at num_steps, after warm-up
    c.train.warmup_steps = min(c.train.warmup_steps, steps - 1)
  c.train.log_every = 1
  c.train.eval_every = steps
  c.train.eval_steps = 1
  c.train.checkpoint_every = steps
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _distinct_short_configs():
  """{config json: experiments} of the shortened tiny presets: presets that
  shrink to the same config (switch_large = switch_base, t5_large = t5_base)
  train once, under all their names."""
  out = {}
  for path in EXPERIMENTS:
    c = short(load(path), steps=2)
    out.setdefault(c.to_json(sort_keys=True), []).append(path)
  return out


SHORT_CONFIGS = _distinct_short_configs()


def test_every_experiment_has_a_short_config_that_trains():
  assert sorted(p for ps in SHORT_CONFIGS.values() for p in ps) == EXPERIMENTS


@pytest.mark.parametrize("paths", list(SHORT_CONFIGS.values()),
                         ids=lambda ps: "=".join(map(os.path.basename, ps)))
def test_tiny_config_trains(paths, tmp_path):
  config = short(load(paths[0]), steps=2)
  summary = train.train_and_evaluate(config, str(tmp_path))
  rows = read_metrics(tmp_path)
  train_rows = [r for r in rows if "split" not in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  for key in ("loss", "aux_loss", "z_loss", "dropped_fraction",
              "tokens_per_sec"):
    assert np.isfinite(train_rows[-1][key]), key
  assert [r for r in rows if r.get("split") == "eval"]
  assert np.isfinite(summary["eval_loss"])
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
  # The loss starts near log(vocab): the model is not handed the answer.
  assert abs(train_rows[0]["loss"] - np.log(8192)) < 1.5


def switch_tiny():
  return load(os.path.join(ROOT, "experiments", "switch_base.py"))


def test_checkpoint_restores_the_saved_state(tmp_path):
  config = validate.prepare(short(switch_tiny(), steps=2))
  trainer = train.make_trainer(config)
  from switchjax import checkpoint as ckpt_lib
  from switchjax import data as data_lib
  state = trainer.init_state()
  it = data_lib.make_iterator(config, "train", batch_size=config.train.batch_size)
  state, _ = trainer.train_step(state, train._global_batch(trainer, next(it)))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
  ckpt.save(1, state, it)
  expected_next = next(it)
  fresh = data_lib.make_iterator(config, "train", batch_size=config.train.batch_size)
  restored = ckpt.restore(1, trainer.abstract_state, fresh)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  got = next(fresh)
  for k in expected_next:
    np.testing.assert_array_equal(got[k], expected_next[k])
  ckpt.close()


def test_seeds_share_one_compiled_train_step():
  """The seed reaches the step as an input, not a constant in its program,
  so a sweep's persistent cache compiles the step once for all seeds; and
  the step does draw from it (jitter and dropout differ by seed)."""
  from switchjax import data as data_lib
  trainers = []
  for seed in (0, 1):
    c = short(switch_tiny(), steps=1)
    c.seed = seed
    trainers.append(train.make_trainer(validate.prepare(c)))
  t0, t1 = trainers
  it = data_lib.make_iterator(t0.config, "train",
                              batch_size=t0.config.train.batch_size)
  batch = train._global_batch(t0, next(it))
  state = t0.init_state()
  texts = [t._jit_train.lower(state, t.rng_state, t.base_key, batch).as_text()
           for t in trainers]
  assert texts[0] == texts[1]
  losses = []
  for key in (t0.base_key, t1.base_key):  # one program, compiled once
    fresh = jax.tree.map(jnp.copy, state)  # the step donates its state
    _, m = t0._jit_train(fresh, t0.rng_state, key, batch)
    losses.append(float(m["loss"]))
  assert losses[0] != losses[1]


@pytest.mark.parametrize("override,message", [
    ({"moe.train_capacity_factor": 0.0}, "train_capacity_factor"),
    ({"moe.num_selected": 9, "moe.router": "topk"}, "num_selected"),
    ({"moe.decoder_router": "expert_choice"}, "future tokens leak"),
    ({"moe.group_size": 300}, "group_size"),
    ({"moe.router": "top1"}, "moe.router must be one of"),
    ({"mesh.data": 3}, "devices"),
    ({"mesh.data": 1, "mesh.expert": 8, "moe.num_experts": 4}, "divisible"),
    ({"train.batch_size": 4}, "batch shards"),
])
def test_bad_configs_are_refused_before_work(override, message, tmp_path):
  config = switch_tiny()
  for key, value in override.items():
    section, name = key.split(".")
    config[section][name] = value
  workdir = tmp_path / "w"
  with pytest.raises(validate.ConfigError, match=message):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_cross_entropy_against_hand_values():
  logits = jax.numpy.array([[[0.0, np.log(3.0)], [2.0, 0.0]]])
  targets = jax.numpy.array([[1, 1]])
  weights = jax.numpy.array([[1.0, 0.0]])
  loss, metrics = losses.cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(loss, -np.log(0.75), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 1.0)
  loss_z, _ = losses.cross_entropy(logits, targets, weights, z_loss=1e-2)
  np.testing.assert_allclose(loss_z - loss, 1e-2 * np.log(4.0) ** 2,
                             rtol=1e-5)


def test_eval_means_are_weighted_by_target_tokens():
  rows = [{"loss": np.float32(1.0), "tokens": np.float32(1.0),
           "layers": {"l": {"expert_load": np.array([1.0, 0.0], np.float32)}}},
          {"loss": np.float32(3.0), "tokens": np.float32(3.0),
           "layers": {"l": {"expert_load": np.array([0.0, 1.0], np.float32)}}},
          {"loss": np.float32(9.0), "tokens": np.float32(0.0),  # a zero batch
           "layers": {"l": {"expert_load": np.array([0.5, 0.5], np.float32)}}}]
  mean = train._mean_metrics(rows)
  assert mean["loss"] == pytest.approx((1 * 1 + 3 * 3) / 4)
  assert mean["tokens"] == 4.0
  np.testing.assert_allclose(mean["layers"]["l"]["expert_load"], [0.25, 0.75])

