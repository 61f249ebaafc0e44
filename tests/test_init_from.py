"""A new run from trained weights: train.init_from and train.upcycle_from."""
import json
import os
import re
import shutil
import subprocess
import sys

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

from switchjax import checkpoint as ckpt_lib
from switchjax import data as data_lib
from switchjax import init_from
from switchjax import partitioning
from switchjax import losses
from switchjax import train
from switchjax import validate

from test_train import load, read_metrics, short

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5 = os.path.join(ROOT, "experiments", "t5_base.py")


def dense_config(steps=2):
  """A small dense decoder-only model (gated GELU: wi_0, wi_1, wo)."""
  c = short(load(T5), steps=steps)
  c.model.arch = "decoder_only"
  return c


def moe_config(source):
  """dense_config's model with layer 1 sparse, upcycled from `source`: top-2
  with weights summing to 1, capacity for every token (no drops)."""
  c = dense_config()
  e = c.moe
  e.num_experts, e.sparse_every = 4, 2
  e.router, e.num_selected, e.normalize_weights = "topk", 2, True
  e.train_capacity_factor = e.eval_capacity_factor = float(e.num_experts)
  c.train.upcycle_from = source
  return c


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A dense workdir trained 2 steps (its params are no fresh init's)."""
  workdir = str(tmp_path_factory.mktemp("dense") / "run")
  train.train_and_evaluate(dense_config(), workdir)
  return workdir


def source_state(workdir):
  """The newest train state of `workdir`, read by its own config and trainer
  (not through init_from)."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  trainer = train.make_trainer(config)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=10, log=None)
  try:
    step = checkpointer.latest_step()
    return step, checkpointer.restore(step, trainer.abstract_state, None)
  finally:
    checkpointer.close()


def train_steps(workdir):
  return [r["step"] for r in read_metrics(workdir) if "split" not in r]


def by_path(params):
  return {k: np.asarray(v) for k, v in
          init_from.flat(nnx.to_pure_dict(params)).items()}


def assert_same_tree(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_a_workdir_starts_at_step_0_with_its_params(
    dense_run, tmp_path, capsys):
  source = str(tmp_path / "source")
  shutil.copytree(dense_run, source)
  step, saved = source_state(source)
  config = dense_config(steps=3)
  config.train.init_from = source
  workdir = str(tmp_path / "new")
  run = train._setup_run(config, workdir, allow_config_change=False)
  try:
    assert run.start == 0 and int(run.state["step"]) == 0
    assert int(run.state["skipped_steps"]) == 0
    got, want = by_path(run.state["params"]), by_path(saved["params"])
    assert sorted(got) == sorted(want)
    for path in want:  # bit for bit
      np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    fresh = run.trainer.init_state()
    assert_same_tree(run.state["opt_state"], fresh["opt_state"])
    # Not trivially so: the source's optimizer state is not a fresh one,
    # nor are its params.
    with pytest.raises(AssertionError):
      assert_same_tree(saved["opt_state"], fresh["opt_state"])
    fresh_params = by_path(fresh["params"])
    assert any(not np.array_equal(fresh_params[p], want[p]) for p in want)
  finally:
    run.close()
  assert f"params from {source} (step {step})" in capsys.readouterr().out

  train.train_and_evaluate(config, workdir)
  assert train_steps(workdir) == [1, 2, 3]
  _, trained = source_state(workdir)
  assert any(not np.array_equal(v, want[p])
             for p, v in by_path(trained["params"]).items())

  # Once the run has checkpoints it resumes from them: the source is not read.
  shutil.rmtree(source)
  config.train.num_steps = 4
  capsys.readouterr()
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "resumed from" in out and "params from" not in out
  assert train_steps(workdir) == [1, 2, 3, 4]


def test_weights_that_do_not_fit_are_refused_before_anything_is_written(
    dense_run, tmp_path):
  def refused(message, **overrides):
    config = dense_config()
    config.train.init_from = dense_run
    for key, value in overrides.items():
      section, name = key.split("__")
      config[section][name] = value
    workdir = tmp_path / "new"
    with pytest.raises(validate.ConfigError, match=message):
      train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()

  refused(re.escape(
      f"train.init_from={dense_run} does not fit this model (decoder/layers/0/"
      "mlp/wi_0 is float32[32, 64] there, float32[32, 128] here; ") +
      r"\d+ more differences\)$", model__d_ff=128)
  # A parameter the source lacks, and one the model lacks.
  refused(r"\(decoder/layers/0/mlp/wi is missing there, float32\[32, 64\] "
          "here;", model__activation="relu")
  refused(r"\(head is float32\[32, 8192\] there and absent here\)$",
          model__tie_embeddings=True)
  # The weights fix the vocabulary: one smaller than the data's is refused.
  refused(r"model\.vocab_size=100 .* smaller than the data vocabulary's "
          "8192 ids", model__vocab_size=100)
  refused(r"train\.init_from=/nonexistent/run: no such directory$",
          train__init_from="/nonexistent/run")
  neither = tmp_path / "neither"
  (neither / "checkpoints").mkdir(parents=True)
  (neither / "config.json").write_text("{}")
  refused(r"is neither a switchjax workdir with checkpoints .* nor a Hugging "
          r"Face directory", train__init_from=str(neither))
  refused(r"train\.init_from=.* and train\.upcycle_from=.* are both set",
          train__upcycle_from=dense_run)


def test_without_init_from_the_vocabulary_comes_from_the_data():
  config = dense_config()
  config.model.vocab_size = 100
  assert validate.prepare(config).model.vocab_size == 8192


def _logits(trainer, params, batch):
  """Eval-mode logits f32[B, L, V] and the fraction of tokens dropped."""
  config = trainer.config

  def forward(params, batch):
    model = nnx.merge(trainer.eval_graphdef, params, trainer.rng_state)
    logits, aux = model(**losses.model_inputs(batch, config.model.arch))
    return logits, losses.router_metrics(aux)["dropped_fraction"]

  rules = partitioning.rules_from_config(config)
  forward = partitioning.in_mesh(forward, trainer.mesh, rules)
  return jax.jit(forward)(params, batch)


def test_upcycled_model_computes_the_dense_model_at_step_0(
    dense_run, tmp_path, capsys):
  _, dense_state = source_state(dense_run)
  config = moe_config(dense_run)
  run = train._setup_run(config, str(tmp_path / "moe"),
                         allow_config_change=False)
  try:
    state, trainer = run.state, run.trainer
    assert int(state["step"]) == 0
    assert_same_tree(state["opt_state"], trainer.init_state()["opt_state"])
    dense_trainer = train.make_trainer(validate.prepare(dense_config()))
    it = data_lib.make_iterator(trainer.config, "validation",
                                batch_size=config.train.batch_size)
    batch = train._global_batch(trainer, next(it))
    want, _ = _logits(dense_trainer, dense_state["params"], batch)
    got, dropped = _logits(trainer, state["params"], batch)
    assert float(dropped) == 0.0  # the premise: every token reaches 2 experts
    np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                               rtol=1e-5, atol=1e-5)

    moe, dense = by_path(state["params"]), by_path(dense_state["params"])
    fresh = by_path(trainer.init_state()["params"])
    for w in ("wi_0", "wi_1", "wo"):
      experts = moe[f"decoder/layers/1/mlp/experts/{w}"]
      assert experts.shape[0] == 4
      for e in range(4):
        np.testing.assert_array_equal(experts[e],
                                      dense[f"decoder/layers/1/mlp/{w}"])
    router = "decoder/layers/1/mlp/router/kernel"
    np.testing.assert_array_equal(moe[router], fresh[router])  # fresh
    shared = [p for p in dense if not p.startswith("decoder/layers/1/mlp/")]
    assert len(shared) == len(moe) - 4  # all but 3 expert stacks and the router
    for path in shared:  # everything else copied
      np.testing.assert_array_equal(moe[path], dense[path], err_msg=path)
  finally:
    run.close()
  assert "upcycled from" in capsys.readouterr().out


def test_upcycling_refuses_a_sparse_source_and_other_shapes(
    dense_run, tmp_path):
  config = moe_config(dense_run)
  config.moe.d_ff = 128
  with pytest.raises(validate.ConfigError, match=re.escape(
      "(decoder/layers/1/mlp/wi_0 (the experts of decoder/layers/1/mlp/"
      "experts/wi_0) is float32[32, 64] there, float32[32, 128] here;")):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()

  # An MoE source (weights only, as the converter writes them).
  sparse = str(tmp_path / "sparse")
  trainer = train.make_trainer(validate.prepare(moe_config("")))
  checkpointer = ckpt_lib.Checkpointer(sparse, max_to_keep=1, log=None)
  checkpointer.save(0, trainer.init_state(), None)
  checkpointer.close()
  with pytest.raises(validate.ConfigError, match=re.escape(
      f"train.upcycle_from={sparse} is not a dense model (it has decoder/"
      "layers/1/mlp/experts/wi_0)")):
    train.train_and_evaluate(moe_config(sparse), str(tmp_path / "b"))

  dense_target = dense_config()
  dense_target.train.upcycle_from = dense_run
  with pytest.raises(validate.ConfigError,
                     match=r"moe\.num_experts=0 \(dense\)"):
    train.train_and_evaluate(dense_target, str(tmp_path / "c"))


def test_command_line_refuses_weights_of_another_shape_in_one_line(
    dense_run, tmp_path):
  """The tiny preset (d_model 128) from the shortened run's weights (32)."""
  workdir = tmp_path / "new" / "w"
  env = {**os.environ,
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run(
      [sys.executable, "-m", "switchjax.main", "--config", f"{T5}:tiny",
       "--workdir", str(workdir), "--config.model.arch=decoder_only",
       f"--config.train.init_from={dense_run}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert "Traceback" not in out.stderr
  assert re.fullmatch(r"error: train\.init_from=\S+ does not fit this model "
                      r"\(decoder/final_norm/scale is float32\[32\] there, "
                      r"float32\[128\] here; \d+ more differences\)",
                      lines[-1]), lines[-1]
  assert not workdir.parent.exists()


HF_T5 = os.path.join(ROOT, "tests", "data", "hf_reference", "t5_v1_1_gated")


def test_init_from_a_hugging_face_directory(tmp_path):
  from switchjax import hf_checkpoint  # pylint: disable=g-import-not-at-top
  hf_config, hf_params = hf_checkpoint.read_hf(HF_T5)[:2]
  trainer = train.make_trainer(hf_config)
  weights = init_from.start(HF_T5, trainer.abstract_state["params"])
  assert weights.line == f"params from {HF_T5} (Hugging Face)"
  got = by_path(trainer.init_state(weights)["params"])
  want = {"/".join(map(str, k)): np.asarray(v) for k, v in hf_params.items()}
  assert sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)

  # Its 128-id vocabulary cannot hold the bundled corpus's 8192 ids.
  config = ml_collections.ConfigDict(hf_config.to_dict())
  config.data, config.train = dense_config().data, dense_config().train
  config.train.init_from = HF_T5
  with pytest.raises(validate.ConfigError, match=r"model\.vocab_size=128 .* "
                     r"smaller than the data vocabulary's 8192 ids"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
