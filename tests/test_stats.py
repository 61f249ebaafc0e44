"""The reproduction's statistics on hand-made inputs: intervals, verdicts, speedup."""
import math

import numpy as np
import pytest

from switchjax import stats

T_975_DF2 = 4.302652729911275  # Student t, 97.5th percentile, 2 degrees of freedom
T_975_DF4 = 2.7764451051977987


def test_t_interval_by_hand():
  iv = stats.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1
  half = T_975_DF2 * 1.0 / math.sqrt(3)
  assert iv.n == 3 and iv.mean == pytest.approx(2.0)
  assert iv.low == pytest.approx(2.0 - half) and iv.high == pytest.approx(2.0 + half)


def test_paired_interval_agrees():
  switch = [5.00, 5.10, 4.90]
  dense = [5.20, 5.30, 5.20]  # d = -0.2, -0.2, -0.3
  iv = stats.paired_interval(switch, dense)
  sd = math.sqrt(((1 / 30) ** 2 * 2 + (2 / 30) ** 2) / 2)  # sd of d by hand
  half = T_975_DF2 * sd / math.sqrt(3)
  assert iv.mean == pytest.approx(-0.7 / 3)
  assert iv.high == pytest.approx(-0.7 / 3 + half)
  assert iv.high < 0
  assert stats.verdict(iv, paper_sign=-1) == "agrees"
  assert stats.verdict(iv, paper_sign=+1) == "disagrees"


def test_inconclusive_when_the_interval_holds_zero():
  # A mean in the paper's direction is not enough: the spread covers zero.
  iv = stats.paired_interval([4.9, 5.1, 4.95], [5.0, 5.0, 5.0])
  assert iv.mean < 0 < iv.high and iv.low < 0
  assert stats.verdict(iv, paper_sign=-1) == "inconclusive"
  assert stats.verdict(iv, paper_sign=+1) == "inconclusive"


def test_one_seed_is_never_conclusive():
  iv = stats.t_interval([-3.0])
  assert math.isinf(iv.low) and math.isinf(iv.high)
  assert stats.verdict(iv, -1) == "inconclusive"


def test_interval_narrows_with_seeds():
  d3 = [-0.10, -0.02, -0.06]
  d5 = d3 + [-0.10, -0.02]
  iv3, iv5 = stats.t_interval(d3), stats.t_interval(d5)
  assert iv5.high - iv5.low < iv3.high - iv3.low
  sd5 = math.sqrt(sum((x - iv5.mean) ** 2 for x in d5) / 4)
  assert iv5.high - iv5.mean == pytest.approx(T_975_DF4 * sd5 / math.sqrt(5))


def test_bad_inputs():
  with pytest.raises(ValueError):
    stats.paired_interval([1.0, 2.0], [1.0])
  with pytest.raises(ValueError):
    stats.t_interval([1.0, float("nan")])
  with pytest.raises(ValueError):
    stats.verdict(stats.t_interval([1.0, 2.0]), 0)


def test_tokens_to_reach_interpolates_in_log_tokens():
  tokens, losses = [1.0, 2.0, 4.0, 8.0], [5.0, 4.0, 3.0, 2.0]
  # 3.5 is halfway between the evaluations at 2 and 4 tokens: 2 * sqrt(2).
  assert stats.tokens_to_reach(tokens, losses, 3.5) == pytest.approx(2 * math.sqrt(2))
  assert stats.tokens_to_reach(tokens, losses, 4.0) == pytest.approx(2.0)
  assert stats.tokens_to_reach(tokens, losses, 6.0) == pytest.approx(1.0)
  assert stats.tokens_to_reach(tokens, losses, 1.5) is None
  # The first crossing counts, not a later one after a spike.
  assert stats.tokens_to_reach([1, 2, 3, 4], [5, 3, 6, 2], 3.0) == pytest.approx(2.0)


def test_speedup():
  dense_tokens, dense_losses = [1.0, 2.0, 4.0, 8.0], [5.0, 4.0, 3.0, 2.0]
  ratio, exact = stats.speedup(dense_tokens, dense_losses, target_loss=3.5,
                               target_tokens=2.0)
  assert exact and ratio == pytest.approx(math.sqrt(2))
  # Switch's loss below anything the dense run reached: a lower bound.
  ratio, exact = stats.speedup(dense_tokens, dense_losses, target_loss=1.0,
                               target_tokens=4.0)
  assert not exact and ratio == pytest.approx(2.0)


def test_resolve_probability_matches_simulated_reruns():
  # Independent of the noncentral t: draw many reruns of n seeds with
  # normal per-seed differences, apply the t interval and count those
  # that exclude zero on the effect's side.
  rng = np.random.default_rng(0)
  for effect, sd, n in ((0.012, 0.008, 3), (0.012, 0.008, 10),
                        (-0.05, 0.02, 4), (0.0, 1.0, 5)):
    x = rng.normal(effect, sd, size=(200_000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(n))
    crit = {3: 4.3027, 4: 3.1824, 5: 2.7764, 10: 2.2622}[n]
    simulated = np.mean(t > crit if effect >= 0 else t < -crit)
    assert stats.resolve_probability(effect, sd, n) == pytest.approx(
        simulated, abs=0.005), (effect, sd, n)
  # No effect: only the interval's own 2.5 % on that side.
  assert stats.resolve_probability(0.0, 1.0, 5) == pytest.approx(0.025)
  assert stats.resolve_probability(0.1, 0.0, 3) == 1.0
  with pytest.raises(ValueError, match="n >= 2"):
    stats.resolve_probability(0.1, 1.0, 1)


def test_seeds_for_replication():
  need = stats.seeds_for_replication(0.012, 0.008, probability=0.9)
  assert stats.resolve_probability(0.012, 0.008, need) >= 0.9
  assert stats.resolve_probability(0.012, 0.008, need - 1) < 0.9
  assert 5 < need < 15  # two sd-widths of effect: a handful of seeds
  assert stats.seeds_for_replication(0.0, 1.0) is None
  assert stats.seeds_for_replication(0.1, 0.0) == 2
