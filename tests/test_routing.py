"""Routers against hand-worked cases and the papers' formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchjax import routing


def logits_of(probs):
  """Logits whose softmax is `probs` f32[G, S, E] (rows must sum to 1)."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


# Four tokens, three experts; rows are the router probabilities.
P = [[[0.7, 0.2, 0.1],
      [0.6, 0.3, 0.1],
      [0.5, 0.1, 0.4],
      [0.1, 0.8, 0.1]]]


def slots(r):
  """{(expert, slot): (token, weight)} of group 0, empty slots left out."""
  out = {}
  ti, w = np.asarray(r.token_index[0]), np.asarray(r.slot_weight[0])
  for e in range(ti.shape[0]):
    for c in range(ti.shape[1]):
      if ti[e, c] < r.num_tokens:
        out[(e, c)] = (int(ti[e, c]), round(float(w[e, c]), 5))
  return out


class TestExpertCapacity:

  @pytest.mark.parametrize("args,expected", [
      ((1024, 8, 1.25), 160),
      ((1024, 8, 1.0, 2), 256),  # GShard's 2S/E
      ((100, 10, 1.1), 11),  # not 12: 1.1*100/10 is 11.000000000000002
      ((10, 4, 1.0), 4),  # ceil(2.5)=3, raised to min_capacity 4
      ((10, 4, 1.0, 1, 1), 3),
      ((512, 2048, 1.0, 1, 1), 1),
  ])
  def test_formula(self, args, expected):
    assert routing.expert_capacity(*args) == expected

  @pytest.mark.parametrize("args", [
      (0, 8, 1.0), (16, 0, 1.0), (16, 8, 0.0), (16, 8, -1.0),
      (16, 8, 1.0, 9), (16, 8, 1.0, 0), (16, 8, 1.0, 1, 0)])
  def test_bad_arguments(self, args):
    with pytest.raises(ValueError):
      routing.expert_capacity(*args)


class TestSwitchTop1:

  def test_overflow_drops_in_token_order(self):
    r = routing.switch_top1(logits_of(P), capacity=2)
    # Tokens 0, 1, 2 pick expert 0; only the first two fit. Token 3 -> e1.
    assert slots(r) == {(0, 0): (0, 0.7), (0, 1): (1, 0.6), (1, 0): (3, 0.8)}
    np.testing.assert_allclose(r.metrics.dropped_fraction, 0.25)
    np.testing.assert_allclose(r.metrics.expert_load, [2 / 3, 1 / 3, 0])
    assert r.slot_index[0, 2, 0] == 3 * 2  # dropped: the dump slot E*C
    assert r.token_weight[0, 2, 0] == 0.0

  def test_dense_tensors(self):
    r = routing.switch_top1(logits_of(P), capacity=2)
    mask = np.asarray(r.dispatch_mask())
    assert mask.shape == (1, 4, 3, 2) and mask.dtype == bool
    expected = np.zeros((1, 4, 3, 2), bool)
    expected[0, 0, 0, 0] = expected[0, 1, 0, 1] = expected[0, 3, 1, 0] = True
    np.testing.assert_array_equal(mask, expected)
    combine = np.asarray(r.combine_weights())
    np.testing.assert_allclose(combine, expected * np.asarray(
        [0.7, 0.6, 0.5, 0.8])[None, :, None, None], rtol=1e-6)

  def test_aux_loss_matches_eq_4_to_6(self):
    r = routing.switch_top1(logits_of(P), capacity=4)
    f = np.array([3, 1, 0]) / 4  # argmax counts, before dropping
    p = np.mean(np.array(P[0]), axis=0)
    np.testing.assert_allclose(r.aux_loss, 3 * np.sum(f * p), rtol=1e-6)
    # f counts choices before dropping: a capacity of 1 changes nothing.
    np.testing.assert_allclose(
        routing.switch_top1(logits_of(P), capacity=1).aux_loss, r.aux_loss)

  def test_aux_loss_is_one_when_uniform_and_grows_with_imbalance(self):
    e, s = 4, 8
    # Each token puts the same mass on its argmax; argmaxes spread evenly.
    def balanced(peak):
      probs = np.full((1, s, e), (1 - peak) / (e - 1))
      probs[0, np.arange(s), np.arange(s) % e] = peak
      return probs
    assert math.isclose(
        float(routing.switch_top1(logits_of(np.full((1, s, e), 1 / e)), 8)
              .aux_loss), 1.0, rel_tol=1e-6)  # ties: all pick e0, P uniform
    for peak in (0.3, 0.6, 0.9):
      np.testing.assert_allclose(
          routing.switch_top1(logits_of(balanced(peak)), 8).aux_loss, 1.0,
          rtol=1e-6)
    # Move tokens onto expert 0: the loss rises monotonically up to E.
    losses = []
    for n in range(0, s + 1, 2):
      probs = balanced(0.7)
      probs[0, :n] = [0.7] + [0.1] * 3
      losses.append(float(routing.switch_top1(logits_of(probs), 8).aux_loss))
    assert all(b > a for a, b in zip(losses[2:], losses[3:]))
    assert losses[-1] == pytest.approx(e * 1.0 * 0.7, rel=1e-5)

  def test_ties_go_to_lower_expert(self):
    r = routing.switch_top1(jnp.zeros((1, 2, 4)), capacity=4)
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [0, 0])

  def test_gradient_reaches_router_through_combine_weight(self):
    logits = logits_of(P)

    def f(l):
      return jnp.sum(routing.switch_top1(l, 2).combine_weights())

    # Kept tokens 0, 1, 3 contribute p_argmax; d p_i / d l_j = p_i(d_ij - p_j).
    expected = np.zeros((1, 4, 3))
    for t in (0, 1, 3):
      p = np.array(P[0][t])
      i = int(np.argmax(p))
      expected[0, t] = p[i] * ((np.arange(3) == i) - p)
    np.testing.assert_allclose(jax.grad(f)(logits), expected, atol=1e-6)
    # The weight is the probability, not a straight-through 1.0.
    np.testing.assert_allclose(
        routing.switch_top1(logits, 2).token_weight[0, :, 0],
        [0.7, 0.6, 0.0, 0.8], rtol=1e-6)

  def test_batch_prioritized_claims_by_confidence(self):
    probs = [[[0.5, 0.5, 0.0], [0.6, 0.2, 0.2], [0.9, 0.05, 0.05]]]
    probs = np.asarray(probs) + 1e-6
    r = routing.switch_top1(logits_of(probs / probs.sum(-1, keepdims=True)),
                            capacity=1, batch_prioritized=True)
    assert {k: v[0] for k, v in slots(r).items()} == {(0, 0): 2}
    r = routing.switch_top1(logits_of(probs / probs.sum(-1, keepdims=True)),
                            capacity=1)
    assert {k: v[0] for k, v in slots(r).items()} == {(0, 0): 0}


class TestGShardTop2:

  def test_second_choices_take_only_leftover_slots(self):
    r = routing.gshard_top2(logits_of(P), capacity=1)
    # First choices: e0 <- t0 (t1, t2 overflow), e1 <- t3. Second choices in
    # token order: t0 -> e1 full, t1 -> e1 full, t2 -> e2 free, t3 -> e0 full
    # (t3's 0.1 tie between e0 and e2 goes to the lower index).
    assert slots(r) == {(0, 0): (0, round(0.7 / 0.9, 5)),
                        (1, 0): (3, round(0.8 / 0.9, 5)),
                        (2, 0): (2, round(0.4 / 0.9, 5))}
    np.testing.assert_array_equal(r.expert_index[0],
                                  [[0, 1], [0, 1], [0, 2], [1, 0]])
    np.testing.assert_allclose(r.metrics.dropped_fraction, 0.25)  # token 1

  def test_first_choices_claim_before_any_second(self):
    # t0's second choice (e1) would come before t1's first (e1) in token order.
    probs = [[[0.6, 0.4, 0.0], [0.1, 0.9, 0.0]]]
    probs = np.asarray(probs) + 1e-7
    r = routing.gshard_top2(logits_of(probs), capacity=1)
    assert slots(r)[(1, 0)][0] == 1

  def test_weights_normalised_before_dropping(self):
    r = routing.gshard_top2(logits_of(P), capacity=1)
    # Token 0 lost its second choice but keeps g1 = p1/(p1+p2), not 1.0.
    np.testing.assert_allclose(r.token_weight[0, 0], [0.7 / 0.9, 0.0],
                               rtol=1e-6)

  def test_aux_loss_uses_first_choices(self):
    r = routing.gshard_top2(logits_of(P), capacity=4)
    f = np.array([3, 1, 0]) / 4
    p = np.mean(np.array(P[0]), axis=0)
    np.testing.assert_allclose(r.aux_loss, 3 * np.sum(f * p), rtol=1e-6)

  def test_random_policy(self):
    g, s, e = 2, 512, 4
    logits = jax.random.normal(jax.random.PRNGKey(0), (g, s, e))
    r_all = routing.gshard_top2(logits, s)
    r = routing.gshard_top2(logits, s, "random", jax.random.PRNGKey(1))
    g2 = np.asarray(r_all.token_weight[..., 1])
    kept2 = np.asarray(r.token_weight[..., 1] > 0)
    # Keep probability is min(1, 2*g2): compare the kept count to its mean.
    expected = np.sum(np.minimum(1.0, 2 * g2))
    assert abs(kept2.sum() - expected) < 4 * math.sqrt(g * s)
    assert np.all(kept2 <= (g2 > 0))
    # Same rng, same routing; the first choices are untouched.
    r_again = routing.gshard_top2(logits, s, "random", jax.random.PRNGKey(1))
    np.testing.assert_array_equal(r.token_index, r_again.token_index)
    np.testing.assert_array_equal(r.token_weight[..., 0],
                                  r_all.token_weight[..., 0])

  def test_bad_arguments(self):
    with pytest.raises(ValueError, match="rng"):
      routing.gshard_top2(logits_of(P), 2, "random")
    with pytest.raises(ValueError, match="policy"):
      routing.gshard_top2(logits_of(P), 2, "sometimes")
    with pytest.raises(ValueError, match="2 experts"):
      routing.gshard_top2(jnp.zeros((1, 4, 1)), 2)


class TestExpertChoice:

  def test_each_expert_takes_its_top_tokens(self):
    r = routing.expert_choice(logits_of(P), capacity=2)
    # e0: t0 (.7), t1 (.6); e1: t3 (.8), t1 (.3); e2: t2 (.4), then one of
    # the three 0.1s (equal only up to float rounding).
    got = slots(r)
    tie = got.pop((2, 1))
    assert tie in {(0, 0.1), (1, 0.1), (3, 0.1)}
    assert got == {(0, 0): (0, 0.7), (0, 1): (1, 0.6),
                   (1, 0): (3, 0.8), (1, 1): (1, 0.3), (2, 0): (2, 0.4)}
    assert float(r.aux_loss) == 0.0
    assert r.expert_index is None
    # Token 1 is picked by two experts; the combine tensor says so.
    expected = np.array([0.7, 0.9, 0.4, 0.8])
    expected[tie[0]] += 0.1
    np.testing.assert_allclose(
        np.asarray(r.combine_weights()).sum(axis=(2, 3))[0], expected,
        rtol=1e-6)

  def test_exact_ties_go_to_lower_token(self):
    r = routing.expert_choice(jnp.zeros((1, 4, 2)), capacity=2)
    np.testing.assert_array_equal(r.token_index[0], [[0, 1], [0, 1]])

  def test_unpicked_tokens_count_as_dropped(self):
    r = routing.expert_choice(logits_of(P), capacity=1)
    # e0 <- t0, e1 <- t3, e2 <- t2: token 1 is picked by nobody.
    np.testing.assert_allclose(r.metrics.dropped_fraction, 0.25)

  def test_capacity_beyond_group_leaves_empty_slots(self):
    r = routing.expert_choice(logits_of(P), capacity=6)
    assert r.dispatch_mask().shape == (1, 4, 3, 6)
    assert np.all(np.asarray(r.token_index)[:, :, 4:] == 4)
    assert np.asarray(r.dispatch_mask()).sum() == 12


class TestTopK:

  def test_matches_gshard_all_for_k2(self):
    logits = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 4))
    a = routing.topk(logits, 5, 2)
    b = routing.gshard_top2(logits, 5)
    np.testing.assert_array_equal(a.dispatch_mask(), b.dispatch_mask())
    np.testing.assert_allclose(a.combine_weights(), b.combine_weights(),
                               rtol=1e-6)

  def test_unnormalised_weights_are_probabilities(self):
    r = routing.topk(logits_of(P), 4, 2, normalize_weights=False)
    np.testing.assert_allclose(r.token_weight[0, 0], [0.7, 0.2], rtol=1e-6)
    r = routing.topk(logits_of(P), 4, 3, normalize_weights=True)
    np.testing.assert_allclose(np.sum(r.token_weight, -1), 1.0, rtol=1e-6)

  def test_k_major_slot_order(self):
    probs = [[[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5],
              [0.1, 0.7, 0.2]]]
    r = routing.topk(logits_of(probs), 2, 3)
    # First choices: e0 <- t0, t1; e1 <- t3 (before t0's second choice,
    # although t0 comes first in token order); e2 <- t2. Second choices:
    # t0 -> e1 fits, t1 -> e1 and t2 -> e1 are dropped, t3 -> e2 fits.
    assert {k: v[0] for k, v in slots(r).items()} == {
        (0, 0): 0, (0, 1): 1, (1, 0): 3, (1, 1): 0, (2, 0): 2, (2, 1): 3}

  def test_aux_loss_uniform_is_one(self):
    e, s = 4, 8
    probs = np.full((1, s, e), 0.1)
    probs[0, np.arange(s), np.arange(s) % e] = 0.5
    probs[0, np.arange(s), (np.arange(s) + 1) % e] = 0.3
    r = routing.topk(logits_of(probs), 8, 2)
    np.testing.assert_allclose(r.aux_loss, 1.0, rtol=1e-6)

  def test_bad_k(self):
    with pytest.raises(ValueError, match="num_selected"):
      routing.topk(logits_of(P), 2, 4)
    with pytest.raises(ValueError, match="num_selected"):
      routing.topk(logits_of(P), 2, 0)


class TestNoisyTopK:

  def test_no_noise_gates_are_softmax_of_top_logits(self):
    logits = logits_of(P)
    r = routing.noisy_topk(logits, jnp.zeros_like(logits), 4, 2)
    top = np.log([0.7, 0.2])
    np.testing.assert_allclose(r.token_weight[0, 0],
                               np.exp(top) / np.exp(top).sum(), rtol=1e-5)

  def test_aux_loss_is_importance_plus_load_cv2(self):
    logits = logits_of(P)
    noise = jnp.zeros_like(logits)
    r = routing.noisy_topk(logits, noise, 4, 1)
    # k=1, no noise: gates are 1 on the argmax. importance = [3, 1, 0].
    imp = np.array([3.0, 1.0, 0.0])
    cv2_imp = imp.var() / imp.mean() ** 2
    # load: Phi((l_e - threshold_e) / std), std = softplus(0) + 0.01.
    from scipy.stats import norm
    lg = np.log(np.array(P[0]))
    std = np.log(2.0) + 1e-2
    load = np.zeros(3)
    for row in lg:
      order = np.sort(row)[::-1]
      for e in range(3):
        thr = order[1] if row[e] >= order[0] else order[0]
        load[e] += norm.cdf((row[e] - thr) / std)
    cv2_load = load.var() / load.mean() ** 2
    np.testing.assert_allclose(r.aux_loss, cv2_imp + cv2_load, rtol=1e-4)

  def test_noise_changes_choices_and_is_reproducible(self):
    logits = jnp.zeros((1, 64, 4))
    noise = jnp.zeros_like(logits)
    a = routing.noisy_topk(logits, noise, 64, 1, rng=jax.random.PRNGKey(0))
    b = routing.noisy_topk(logits, noise, 64, 1, rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    assert len(np.unique(np.asarray(a.expert_index))) == 4


class TestCommon:

  ROUTERS = {
      "switch": lambda l, c: routing.switch_top1(l, c),
      "gshard": lambda l, c: routing.gshard_top2(l, c),
      "expert_choice": lambda l, c: routing.expert_choice(l, c),
      "top3": lambda l, c: routing.topk(l, c, 3),
  }

  @pytest.mark.parametrize("name", list(ROUTERS))
  def test_slots_hold_at_most_one_token_and_views_agree(self, name):
    logits = 3 * jax.random.normal(jax.random.PRNGKey(0), (3, 32, 8))
    r = self.ROUTERS[name](logits, 3)
    mask = np.asarray(r.dispatch_mask())
    assert mask.shape == (3, 32, 8, 3)
    assert mask.sum(axis=1).max() <= 1  # one token per slot
    combine = np.asarray(r.combine_weights())
    assert np.all(combine[~mask] == 0)
    if r.expert_index is not None:  # token-major view = slot-major view
      g, s, k = r.slot_index.shape
      rebuilt = np.zeros((g, s, 8 * 3 + 1))
      np.put_along_axis(rebuilt, np.asarray(r.slot_index),
                        np.asarray(r.token_weight), axis=-1)
      np.testing.assert_allclose(rebuilt[..., :-1].reshape(g, s, 8, 3),
                                 combine, rtol=1e-6)
      # No token goes to the same expert twice.
      for row in np.asarray(r.expert_index).reshape(-1, k):
        assert len(set(row)) == k

  @pytest.mark.parametrize("name", list(ROUTERS))
  def test_jit_and_vmap(self, name):
    fn = self.ROUTERS[name]
    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 16, 8))
    eager = [np.asarray(fn(l, 3).combine_weights()) for l in logits]
    jitted = jax.jit(lambda l: fn(l, 3).combine_weights())
    np.testing.assert_allclose(jitted(logits[0]), eager[0], rtol=1e-6)
    vmapped = jax.vmap(lambda l: fn(l, 3).combine_weights())(logits)
    np.testing.assert_allclose(vmapped, np.stack(eager), rtol=1e-6)

  @pytest.mark.parametrize("name", list(ROUTERS))
  def test_bad_shapes_and_capacity(self, name):
    fn = self.ROUTERS[name]
    with pytest.raises(ValueError, match="G, S, E"):
      fn(jnp.zeros((16, 8)), 2)
    with pytest.raises(ValueError, match="capacity"):
      fn(jnp.zeros((1, 16, 8)), 0)
    with pytest.raises(ValueError, match="capacity"):
      fn(jnp.zeros((1, 16, 8)), 1.5)

  def test_route_dispatches_by_name(self):
    logits = logits_of(P)
    np.testing.assert_array_equal(
        routing.route("switch", logits, 2).token_index,
        routing.switch_top1(logits, 2).token_index)
    np.testing.assert_array_equal(
        routing.route("topk", logits, 2, num_selected=2).token_index,
        routing.topk(logits, 2, 2).token_index)
    with pytest.raises(ValueError, match="unknown router"):
      routing.route("top1", logits, 2)
    with pytest.raises(ValueError, match="noise_logits"):
      routing.route("noisy_topk", logits, 2)

  def test_z_loss(self):
    logits = jnp.array([[[0.0, 0.0], [1.0, 2.0], [-3.0, 5.0]]])
    lse = np.log(np.exp([[0, 0], [1, 2], [-3, 5]]).sum(-1))
    np.testing.assert_allclose(routing.router_z_loss(logits),
                               np.mean(lse ** 2), rtol=1e-6)
    g = jax.grad(routing.router_z_loss)(logits)
    sm = jax.nn.softmax(logits, -1)
    np.testing.assert_allclose(g, 2 * lse[None, :, None] * sm / 3, rtol=1e-5)

  def test_router_metrics(self):
    r = routing.switch_top1(logits_of(P), capacity=4)
    probs = np.array(P[0])
    np.testing.assert_allclose(r.metrics.router_confidence,
                               probs.max(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(r.metrics.router_entropy,
                               -(probs * np.log(probs)).sum(-1).mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(r.metrics.dropped_fraction, 0.0)
