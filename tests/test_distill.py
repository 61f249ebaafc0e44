"""train.distill_from: a dense student on a sparse teacher's soft targets."""
import os

import numpy as np
import pytest

from switchjax import distill
from switchjax import freeze
from switchjax import train
from switchjax import validate

from test_init_from import by_path, source_state
from test_train import load, read_metrics, short

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH = os.path.join(ROOT, "experiments", "switch_base.py")


def student_config(teacher, steps=2, **train_keys):
  """The teacher's shape, dense (Switch distils sparse into dense)."""
  c = short(load(SWITCH), steps=steps)
  c.moe.num_experts = 0
  c.train.distill_from = teacher
  for k, v in train_keys.items():
    c.train[k] = v
  return c


@pytest.fixture
def teacher(switch_run):
  return switch_run


def test_soft_cross_entropy_by_hand():
  rng = np.random.default_rng(0)
  logits, teacher = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  p = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
  log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = (-(p * log_q).sum(-1) * weights).sum() / weights.sum()
  got = distill.soft_cross_entropy(logits, teacher, weights)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_alpha_zero_is_plain_training_and_alpha_weighs_the_teacher(
    teacher, tmp_path, capsys):
  plain = short(load(SWITCH), steps=2)
  plain.moe.num_experts = 0
  train.train_and_evaluate(plain, str(tmp_path / "plain"))
  train.train_and_evaluate(student_config(teacher, distill_alpha=0.0),
                           str(tmp_path / "alpha0"))
  assert f"distilling from {teacher}" in capsys.readouterr().out
  train.train_and_evaluate(student_config(teacher), str(tmp_path / "alpha"))
  rows = {n: [r for r in read_metrics(str(tmp_path / n)) if "split" not in r]
          for n in ("plain", "alpha0", "alpha")}
  for a, b in zip(rows["plain"], rows["alpha0"]):
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
  # Step 1 (same params as the alpha-0 run): total = 0.75 CE + 0.25 soft CE.
  first = rows["alpha"][0]
  assert first["loss"] == rows["alpha0"][0]["loss"]  # the labels' CE, logged
  assert first["distill_loss"] > 0
  assert rows["alpha"][1]["loss"] != rows["alpha0"][1]["loss"]  # trained apart


def test_distill_init_copies_the_teachers_non_expert_weights(teacher,
                                                             tmp_path, capsys):
  _, saved = source_state(teacher)
  want = by_path(saved["params"])
  config = student_config(teacher, distill_init=True)
  run = train._setup_run(config, str(tmp_path / "student"),
                         allow_config_change=False)
  try:
    got = by_path(run.state["params"])
  finally:
    run.close()
  copied = [p for p in got if p in want and not freeze.is_frozen(p, "moe")
            and want[p].shape == got[p].shape]
  for p in copied:
    np.testing.assert_array_equal(got[p], want[p], err_msg=p)
  # The dense FFN where the teacher has experts starts fresh.
  fresh = [p for p in got if p not in want]
  assert fresh and all("/layers/1/mlp/" in p for p in fresh)
  assert f"its {len(copied)} non-expert arrays of {len(got)}" in (
      capsys.readouterr().out)


@pytest.mark.parametrize("keys,message", [
    (dict(distill_from="/nonexistent"), r"train\.distill_from=/nonexistent: "
     "no such directory|holds no config.json"),
    (dict(distill_init=True, distill_from=""), "train.distill_from is not set"),
])
def test_bad_teachers_are_refused(tmp_path, keys, message):
  config = short(load(SWITCH), steps=2)
  for k, v in keys.items():
    config.train[k] = v
  workdir = tmp_path / "run"
  with pytest.raises(validate.ConfigError, match=message):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_a_teacher_of_another_vocabulary_is_refused(teacher, tmp_path):
  config = student_config(teacher)
  config.data.vocab_path = "sentencepiece_2k.model"
  with pytest.raises(validate.ConfigError, match=r"the teacher's "
                     r"model\.vocab_size=8192 is not the student's 2176"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
