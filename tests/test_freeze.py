"""train.freeze: frozen parameters keep their values bit for bit, have no
optimizer state, and a selection of nothing (or everything) is refused."""
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from switchjax import freeze
from switchjax import model as model_lib
from switchjax import train
from switchjax import validate

from test_init_from import by_path, source_state
from test_train import load, short

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH = os.path.join(ROOT, "experiments", "switch_base.py")


def switch_config(steps=2):
  """A small Switch encoder-decoder (Adafactor, per-matrix state)."""
  return short(load(SWITCH), steps=steps)


def param_paths(config):
  params = nnx.state(nnx.eval_shape(
      lambda: model_lib.build_model(config, rngs=nnx.Rngs(0))), nnx.Param)
  return sorted(by_path(jax.tree.map(np.zeros_like, params)))


def test_recipes_select_the_parameters_they_name():
  paths = param_paths(switch_config())
  frozen = {r: {p for p in paths if freeze.is_frozen(p, r)}
            for r in ("experts", "router", "moe", "non_experts")}
  # By hand: the sparse layers (1 of each stack) hold experts/{wi_0,wi_1,wo}
  # and router/kernel.
  want_experts = {f"{s}/layers/1/mlp/experts/{w}" for s in ("encoder", "decoder")
                  for w in ("wi_0", "wi_1", "wo")}
  want_router = {f"{s}/layers/1/mlp/router/kernel" for s in ("encoder", "decoder")}
  assert frozen["experts"] == want_experts
  assert frozen["router"] == want_router
  assert frozen["moe"] == want_experts | want_router
  assert frozen["non_experts"] == set(paths) - frozen["moe"]
  assert "embedding" in frozen["non_experts"]
  assert "encoder/layers/0/mlp/wi_0" in frozen["non_experts"]  # a dense FFN
  # A regular expression is searched in the path.
  assert {p for p in paths if freeze.is_frozen(p, r"self_attention/(query|key)$")
          } == {f"{s}/layers/{i}/self_attention/{w}" for s in ("encoder", "decoder")
                for i in (0, 1) for w in ("query", "key")}
  assert not any(freeze.is_frozen(p, "") for p in paths)


@pytest.fixture
def source_run(switch_run):
  return switch_run


@pytest.mark.parametrize("recipe,optimizer", [("non_experts", "adafactor"),
                                              ("moe", "adamw")])
def test_frozen_parameters_stay_bit_identical_to_init_from(
    source_run, tmp_path, capsys, recipe, optimizer):
  _, source = source_state(source_run)
  config = switch_config(steps=2)
  config.train.init_from, config.train.freeze = source_run, recipe
  config.train.optimizer = optimizer
  workdir = str(tmp_path / "frozen")
  train.train_and_evaluate(config, workdir)
  _, state = source_state(workdir)
  before, after = by_path(source["params"]), by_path(state["params"])
  frozen = [p for p in before if freeze.is_frozen(p, recipe)]
  trains = [p for p in before if p not in frozen]
  assert frozen and trains
  for p in frozen:
    np.testing.assert_array_equal(after[p], before[p], err_msg=p)
  # The others trained (every matrix moved).
  moved = [p for p in trains if not np.array_equal(after[p], before[p])]
  assert set(moved) >= {p for p in trains if after[p].ndim >= 2}
  # No optimizer state for frozen parameters: a run with nothing frozen
  # holds more, by exactly their per-parameter state.
  everything = switch_config()
  everything.train.optimizer = optimizer
  full = train.abstract_train_state(everything)["opt_state"]
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  frozen_size = sum(before[p].size for p in frozen)
  if optimizer == "adamw":  # mu and nu: two of each parameter
    assert count(full) - count(state["opt_state"]) == 2 * frozen_size
  else:
    assert count(full) > count(state["opt_state"])
  total = sum(v.size for v in before.values())
  assert (f"{total - frozen_size:,} train, {frozen_size:,} frozen "
          f"(train.freeze='{recipe}')") in capsys.readouterr().out


@pytest.mark.parametrize("value,message", [
    ("no_such_param", r"train\.freeze='no_such_param' matches no parameter of "
     r"this model \(paths look like '.*'\)$"),
    (".", r"train\.freeze='\.' freezes every parameter: nothing would train$"),
    ("(", r"train\.freeze='\(' is not one of experts, router, moe, non_experts "
     r"nor a regular expression"),
])
def test_freeze_selecting_nothing_or_everything_is_refused(tmp_path, value,
                                                           message):
  config = switch_config()
  config.train.freeze = value
  workdir = tmp_path / "run"
  with pytest.raises(validate.ConfigError, match=message) as e:
    train.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(e.value)
  assert not workdir.exists()


def test_a_dense_model_has_no_experts_to_freeze(tmp_path):
  config = switch_config()
  config.moe.num_experts = 0
  config.train.freeze = "experts"
  with pytest.raises(validate.ConfigError,
                     match=re.escape("train.freeze='experts' matches no "
                                     "parameter")):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_param_paths_with_and_without_the_variables_value_key():
  """A parameter named `value` (attention's) is not mistaken for the
  Variable's own attribute."""
  params = nnx.state(nnx.eval_shape(lambda: model_lib.build_model(
      switch_config(), rngs=nnx.Rngs(0))), nnx.Param)
  leaves = [freeze.param_path(p)
            for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  variables = [freeze.param_path(p) for p, _ in jax.tree_util.
               tree_flatten_with_path(params, is_leaf=lambda x: isinstance(
                   x, nnx.Variable))[0]]
  assert leaves == variables
  assert "decoder/layers/0/self_attention/value" in leaves
