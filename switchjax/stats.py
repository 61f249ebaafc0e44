"""Statistics of the reproduction: paired differences over seeds, verdicts, speedup.

Every finding compares two cells trained with the same seeds (seed i of
both cells sees the same data order and the same eval tokens), so the unit
of evidence is the per-seed difference d_i = value(a, seed i) - value(b,
seed i). The 95 % interval is t-based over those n differences:

    mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)

Verdict rule, stated once for every finding (`verdict`): with the paper's
direction of the effect (the sign it predicts for the difference) the
finding *agrees* when the interval excludes zero on the paper's side,
*disagrees* when it excludes zero on the other side, and is *inconclusive*
otherwise; the effect size (the mean) is reported with it either way.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

VERDICTS = ("agrees", "disagrees", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean of paired differences with its t-based confidence interval."""
  mean: float
  low: float
  high: float
  n: int
  confidence: float = 0.95

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """Mean of `values` (n >= 2) and its two-sided t interval.

  With n = 1 there is no spread to measure: the interval is infinite.
  """
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or x.size < 1 or not np.all(np.isfinite(x)):
    raise ValueError(f"need one or more finite values, got {values!r}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  mean = float(x.mean())
  if x.size == 1:
    return Interval(mean, -math.inf, math.inf, 1, confidence)
  half = half_width(float(x.std(ddof=1)), int(x.size), confidence)
  return Interval(mean, mean - half, mean + half, int(x.size), confidence)


def paired_interval(a: Sequence[float], b: Sequence[float],
                    confidence: float = 0.95) -> Interval:
  """t interval of a_i - b_i, pairs matched by position (the seed)."""
  if len(a) != len(b):
    raise ValueError(f"paired values need equal lengths, got {len(a)} and "
                     f"{len(b)}")
  return t_interval(np.asarray(a, np.float64) - np.asarray(b, np.float64),
                    confidence)


def verdict(interval: Interval, paper_sign: int) -> str:
  """'agrees' / 'disagrees' / 'inconclusive' for the paper's predicted sign.

  paper_sign: -1 when the paper predicts a negative difference (a below b,
  e.g. Switch's loss minus dense's), +1 for a positive one.
  """
  if paper_sign not in (-1, 1):
    raise ValueError(f"paper_sign must be -1 or +1, got {paper_sign}")
  if interval.low > 0:
    return "agrees" if paper_sign > 0 else "disagrees"
  if interval.high < 0:
    return "agrees" if paper_sign < 0 else "disagrees"
  return "inconclusive"


def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float],
                    target: float) -> Optional[float]:
  """Tokens at which a loss curve first reaches `target`, None if it never does.

  Linear interpolation in log(tokens) between the two evaluations that
  bracket the first crossing (loss curves are close to straight lines in
  log tokens over short spans). A curve already at or below the target at
  its first point returns that point's tokens.
  """
  t = np.asarray(tokens, np.float64)
  y = np.asarray(losses, np.float64)
  if t.shape != y.shape or t.ndim != 1 or t.size < 1:
    raise ValueError("tokens and losses must be 1-D and of equal length")
  if np.any(np.diff(t) <= 0) or t[0] <= 0:
    raise ValueError("tokens must be positive and increasing")
  below = np.nonzero(y <= target)[0]
  if below.size == 0:
    return None
  i = int(below[0])
  if i == 0:
    return float(t[0])
  frac = (y[i - 1] - target) / (y[i - 1] - y[i])
  return float(math.exp(math.log(t[i - 1])
                        + frac * (math.log(t[i]) - math.log(t[i - 1]))))


def speedup(dense_tokens: Sequence[float], dense_losses: Sequence[float],
            target_loss: float, target_tokens: float) -> tuple[float, bool]:
  """(dense tokens to reach target_loss / target_tokens, whether it is exact).

  Switch's headline (Fedus et al. 2021, Fig. 1, 4): how many times the
  tokens the dense model needs for the sparse model's final loss. When the
  dense curve never gets there the ratio is a lower bound (its last tokens
  over target_tokens) and the flag is False.
  """
  reached = tokens_to_reach(dense_tokens, dense_losses, target_loss)
  if reached is None:
    return float(dense_tokens[-1]) / target_tokens, False
  return reached / target_tokens, True


def resolve_probability(effect: float, sd: float, n: int,
                        confidence: float = 0.95) -> float:
  """Chance that n new seeds resolve `effect`: that their t interval
  excludes zero on effect's side, when per-seed differences are normal
  with mean effect and standard deviation sd.

  Their t statistic, mean / (s / sqrt(n)), is noncentral t with n - 1
  degrees of freedom and noncentrality effect sqrt(n) / sd; the interval
  excludes zero on the positive side when it exceeds t(0.975, n - 1).
  """
  if n < 2 or sd < 0:
    raise ValueError(f"need n >= 2 and sd >= 0, got n={n}, sd={sd}")
  if sd == 0:
    return 1.0 if effect else 0.0
  crit = scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)
  return float(scipy_stats.nct.sf(crit, n - 1, abs(effect) * math.sqrt(n)
                                  / sd))


def seeds_for_replication(effect: float, sd: float, probability: float = 0.9,
                          confidence: float = 0.95, most: int = 1000
                          ) -> Optional[int]:
  """Fewest seeds whose rerun resolves `effect` (see resolve_probability)
  with at least `probability`; None if not within `most` seeds."""
  for n in range(2, most + 1):
    if resolve_probability(effect, sd, n, confidence) >= probability:
      return n
  return None


def half_width(sd: float, n: int, confidence: float = 0.95) -> float:
  """The t interval's half-width for n values of standard deviation sd."""
  return float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * sd
               / math.sqrt(n))
