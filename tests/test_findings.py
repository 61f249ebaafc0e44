"""The findings' analyses on hand-made runs: differences, intervals, verdicts,
the speedup and the slope per doubling, against values computed by hand."""
import math

import pytest

from switchjax import findings as F

T_975_DF2 = 4.302652729911275
SEEDS = (0, 1, 2)


def _runs(values):
  """{cell: [loss per seed]} -> Runs."""
  return {(cell, s): F.Run(eval_loss=v, tokens_per_sec=1000.0)
          for cell, losses in values.items() for s, v in zip(SEEDS, losses)}


def test_a_agrees_when_switch_is_lower_in_every_seed():
  runs = _runs({"dense": [5.0, 5.1, 5.2], "switch": [4.9, 4.95, 5.0]})
  r = F.analyse_a(runs, SEEDS, tokens=1e6)
  assert r["per_seed_difference"] == pytest.approx([-0.1, -0.15, -0.2])
  half = T_975_DF2 * 0.05 / math.sqrt(3)  # sd of (-0.1, -0.15, -0.2) is 0.05
  assert r["mean_difference"] == pytest.approx(-0.15)
  assert r["interval_95"] == pytest.approx([-0.15 - half, -0.15 + half])
  assert r["verdict"] == "agrees"
  assert r["cells"] == ["switch", "dense"] and r["seeds"] == list(SEEDS)
  assert "speedup" not in r  # no dense_2x runs


def test_a_inconclusive_when_seeds_disagree():
  runs = _runs({"dense": [5.0, 5.0, 5.0], "switch": [4.9, 5.05, 4.98]})
  assert F.analyse_a(runs, SEEDS, tokens=1e6)["verdict"] == "inconclusive"


def test_a_disagrees_when_switch_is_worse():
  runs = _runs({"dense": [5.0, 5.0, 5.0], "switch": [5.1, 5.12, 5.09]})
  assert F.analyse_a(runs, SEEDS, tokens=1e6)["verdict"] == "disagrees"


def test_speedup_interpolates_between_dense_runs_in_log_tokens():
  # Dense: 5.0 at T, 4.8 at 2T; Switch 4.9 sits halfway in loss, so halfway
  # in log tokens: sqrt(2) T. Switch 4.7 is beyond 2T: a lower bound of 2.
  runs = _runs({"dense": [5.0, 5.0, 5.0], "dense_2x": [4.8, 4.8, 4.8],
                "switch": [4.9, 4.9, 4.7]})
  worse = dict(runs)
  worse[("switch", 0)] = F.Run(5.05, tokens_per_sec=1000.0)
  for s in SEEDS:
    runs[("dense", s)].tokens_per_sec = 2000.0
  up = F.analyse_a(runs, SEEDS, tokens=1e6)["speedup"]
  assert up["tokens"] == pytest.approx([math.sqrt(2), math.sqrt(2), 2.0])
  assert up["bound"] == ["exact", "exact", "lower"]
  # Switch runs at half dense's throughput here: half the speedup per second.
  assert up["wall_clock"] == pytest.approx([math.sqrt(2) / 2] * 2 + [1.0])
  # Switch worse than dense at 1x: at most 1; with a dense eval curve, where
  # that curve crosses Switch's loss (5.10 at T/2, 5.00 at T; 5.05 halfway
  # in loss, so halfway in log tokens: T / sqrt(2)).
  up = F.analyse_a(worse, SEEDS, tokens=1e6)["speedup"]
  assert up["tokens"][0] == 1.0 and up["bound"][0] == "upper"
  worse[("dense", 0)].curve = [(2.5e5, 5.3), (5e5, 5.1), (1e6, 5.0)]
  up = F.analyse_a(worse, SEEDS, tokens=1e6)["speedup"]
  assert up["tokens"][0] == pytest.approx(2 ** -0.5)
  assert up["bound"] == ["upper", "exact", "lower"]


def test_dense_2x_is_needed_only_where_switch_beats_dense():
  runs = _runs({"dense": [5.0, 5.0, 5.0], "switch": [5.1, 5.0, 5.2]})
  assert not F.needs_dense_2x(runs, SEEDS)  # a tie is no gain
  runs[("switch", 2)] = F.Run(4.99)
  assert F.needs_dense_2x(runs, SEEDS)


def test_slope_per_doubling():
  assert F.slope_per_doubling([1, 2, 4, 8], [5.0, 4.9, 4.8, 4.7]) == pytest.approx(-0.1)


def test_b_uses_dense_as_one_expert():
  per_e = {1: 5.0, 2: 4.95, 4: 4.9, 8: 4.85, 16: 4.8, 32: 4.75}
  runs = _runs({F.expert_cell(n): [v, v + 0.01, v - 0.01]
                for n, v in per_e.items()})
  r = F.analyse_b(runs, SEEDS)
  assert r["per_seed_difference"] == pytest.approx([-0.05] * 3)
  assert r["cells"] == ["dense", "e2", "e4", "switch", "e16", "e32"]
  # No spread at all: a zero-width interval below zero.
  assert r["verdict"] == "agrees"


def test_b_sparse_slope_leaves_out_dense():
  # Making a layer sparse costs 0.1 against dense; then each doubling of
  # the experts gains 0.02, seed 2 gains 0.03 (hand-fitted lines).
  per_e = {1: 5.0, 2: 5.1, 4: 5.08, 8: 5.06, 16: 5.04, 32: 5.02}
  runs = _runs({F.expert_cell(n): [v] * 3 for n, v in per_e.items()})
  for i, n in enumerate((2, 4, 8, 16, 32)):
    runs[(F.expert_cell(n), 2)] = F.Run(5.1 - 0.03 * i)
  sp = F.analyse_b(runs, SEEDS)["sparse_slope"]
  sd = math.sqrt(((0.02 - 0.07 / 3) ** 2 * 2 + (0.03 - 0.07 / 3) ** 2) / 2)
  half = T_975_DF2 * sd / math.sqrt(3)
  assert sp["mean"] == pytest.approx(-0.07 / 3)
  assert sp["interval_95"] == pytest.approx([-0.07 / 3 - half,
                                             -0.07 / 3 + half])


def test_gap_over_training_pairs_evals_at_equal_tokens():
  runs = _runs({"dense": [5.0] * 3, "switch": [5.1, 5.0, 5.2]})
  for s, (early, late) in enumerate([(0.3, 0.1), (0.2, 0.0), (0.4, 0.2)]):
    runs[("dense", s)].curve = [(5e5, 6.0), (1e6, 5.0)]
    # Switch also evaluated at 7e5, which dense was not: left out.
    runs[("switch", s)].curve = [(5e5, 6.0 + early), (7e5, 5.5),
                                 (1e6, 5.0 + late)]
  gap = F.analyse_a(runs, SEEDS, tokens=1e6)["gap_over_training"]
  assert [g["tokens"] for g in gap] == [5e5, 1e6]
  assert gap[0]["per_seed"] == pytest.approx([0.3, 0.2, 0.4])
  half = T_975_DF2 * 0.1 / math.sqrt(3)
  assert gap[1]["mean"] == pytest.approx(0.1)
  assert gap[1]["interval_95"] == pytest.approx([0.1 - half, 0.1 + half])


def test_missing_runs_are_named():
  runs = _runs({"dense": [5.0, 5.0, 5.0]})
  with pytest.raises(F.Missing, match="switch_s0"):
    F.analyse_a(runs, SEEDS, tokens=1e6)


def test_c_drops_and_quality():
  runs = _runs({"cf1.0": [5.0] * 3, "cf1.25": [4.98] * 3,
                "switch": [4.97, 4.96, 4.95]})
  for cell, drop in (("cf1.0", 8.0), ("cf1.25", 4.0), ("switch", 0.5)):
    for s in SEEDS:
      runs[(cell, s)].dropped_pct = drop
      runs[(cell, s)].late_dropped_pct = drop / 2 + s
  r = F.analyse_c(runs, SEEDS, {"switch": 30.0})
  assert r["drops_fall"] is True
  assert r["late_dropped_pct"]["cf1.25"] == [2.0, 3.0, 4.0]
  assert r["per_seed_difference"] == pytest.approx([-0.03, -0.04, -0.05])
  assert r["verdict"] == "agrees" and r["step_ms"] == {"switch": 30.0}


def test_stress_counts_divergence():
  cells = {}
  for lr in F.STRESS_LRS:
    cells[F.stress_cell("float32", 0.1, lr)] = [4.0] * 3
    cells[F.stress_cell("bfloat16", 0.1, lr)] = [4.1, 4.12, 4.14]
    cells[F.stress_cell("float32", 1.0, lr)] = [4.0] * 3
  runs = _runs(cells)
  r = F.analyse_f(runs, SEEDS)
  assert r["per_seed_difference"] == pytest.approx([0.1, 0.12, 0.14])
  assert r["verdict"] == "agrees"  # the bfloat16 router trains worse
  # Diverged bfloat16-router runs: the verdict comes from the counts.
  lr = F.STRESS_LRS[1]
  for s in SEEDS:
    runs[(F.stress_cell("bfloat16", 0.1, lr), s)] = F.Run(math.nan, diverged=True)
    runs[(F.stress_cell("bfloat16", 0.1, F.STRESS_LRS[0]), s)].eval_loss = math.nan
  r = F.analyse_f(runs, SEEDS)
  assert r["diverged_difference"] == [1.0, 1.0, 1.0]
  assert r["verdict"] == "agrees"
  assert F.analyse_g(runs, SEEDS)["verdict"] == "inconclusive"  # no difference


def test_every_finding_names_known_cells():
  for f in F.FINDINGS.values():
    assert set(f.cells) <= set(F.CELLS), f.id


def test_b_fits_the_counts_that_finished():
  per_e = {1: 5.0, 2: 4.9, 8: 4.7, 32: 4.5}  # -0.1 per doubling exactly
  runs = _runs({F.expert_cell(n): [v] * 3 for n, v in per_e.items()})
  r = F.analyse_b(runs, SEEDS)
  assert list(r["values"]) == ["1", "2", "8", "32"]
  assert r["per_seed_difference"] == pytest.approx([-0.1] * 3)
  # Dense and one sparse count are not enough for a slope.
  runs = _runs({"dense": [5.0] * 3, "e2": [4.9] * 3})
  with pytest.raises(F.Missing):
    F.analyse_b(runs, SEEDS)


def test_j_distillation_keeps_a_fraction_of_the_teachers_gain():
  runs = _runs({"dense": [5.0, 5.1, 5.2], "switch": [4.8, 4.9, 5.0],
                "distilled": [4.94, 5.05, 5.13]})
  r = F.analyse_j(runs, SEEDS)
  assert r["per_seed_difference"] == pytest.approx([-0.06, -0.05, -0.07])
  assert r["verdict"] == "agrees"
  assert r["kept_fraction"] == pytest.approx([0.3, 0.25, 0.35])  # by hand
  assert r["targets_effect"] is None  # no same-start run: nothing to say
  # A teacher no better than dense in some seed: no fraction.
  runs[("switch", 1)] = F.Run(eval_loss=5.2)
  assert F.analyse_j(runs, SEEDS)["kept_fraction"] is None


def test_j_separates_the_teachers_targets_from_the_students_head_start():
  runs = _runs({"dense": [5.0, 5.1, 5.2], "switch": [4.8, 4.9, 5.0],
                "distilled": [4.7, 4.8, 4.9],
                "distill_start": [4.72, 4.79, 4.95]})
  t = F.analyse_j(runs, SEEDS)["targets_effect"]
  assert t["per_seed_difference"] == pytest.approx([-0.02, 0.01, -0.05])
  assert t["verdict"] == "inconclusive"  # the sign changes with the seed
  out = F.cell_overrides("distill_start", 600, seed=1, workdir="DIR")
  assert out["train.distill_from"] == "DIR/switch_s1"
  assert out["train.distill_alpha"] == 0.0 and out["train.distill_init"]


def test_j_student_starts_from_the_seeds_switch_run():
  out = F.cell_overrides("distilled", 600, seed=2, workdir="DIR")
  assert out["train.distill_from"] == "DIR/switch_s2"
  assert out["train.distill_init"] and out["moe.num_experts"] == 0
  assert "train.num_steps" not in out  # the protocol's length


def test_k_compares_the_train_validation_gaps():
  runs = {}
  for s, (dv, dt, sv, st) in enumerate([(3.0, 2.5, 3.2, 2.4),
                                        (3.1, 2.6, 3.3, 2.5),
                                        (3.0, 2.6, 3.25, 2.45)]):
    runs[("ft_dense", s)] = F.Run(eval_loss=dv, late_train_loss=dt)
    runs[("ft_switch", s)] = F.Run(eval_loss=sv, late_train_loss=st)
    runs[("dense", s)] = runs[("switch", s)] = F.Run(eval_loss=4.8)
  r = F.analyse_k(runs, SEEDS)
  # Gaps by hand: dense 0.5, 0.5, 0.4; Switch 0.8, 0.8, 0.8.
  assert r["gap"]["ft_dense"] == pytest.approx([0.5, 0.5, 0.4])
  assert r["per_seed_difference"] == pytest.approx([0.3, 0.3, 0.4])
  assert r["verdict"] == "agrees"  # the paper: Switch overfits more
  assert r["pretrained"]["ft_switch"] == [4.8] * 3


def test_l_expert_dropout_lower_validation_loss_agrees():
  runs = _runs({"ft_switch": [3.0, 3.1, 3.2], "ft_switch_ed": [2.9, 3.0, 3.12]})
  r = F.analyse_l(runs, SEEDS)
  assert r["per_seed_difference"] == pytest.approx([-0.1, -0.1, -0.08])
  assert r["verdict"] == "agrees"


def test_i_only_moe_worse_agrees_and_the_rest_is_reported():
  runs = _runs({"ft_switch": [3.0, 3.1, 3.2], "ft_only_moe": [3.3, 3.35, 3.5],
                "ft_only_non_moe": [3.01, 3.08, 3.2]})
  r = F.analyse_i(runs, SEEDS, {"switch": 100.0, "freeze_moe": 90.0})
  assert r["per_seed_difference"] == pytest.approx([0.3, 0.25, 0.3])
  assert r["verdict"] == "agrees" and r["paper_sign"] == 1
  rest = r["only_non_moe_difference"]
  assert rest["per_seed"] == pytest.approx([0.01, -0.02, 0.0])
  assert rest["interval_95"][0] < 0 < rest["interval_95"][1]
  assert r["step_ms"] == {"ft_switch": 100.0, "ft_only_non_moe": 90.0}


def test_finetuning_cells_start_from_the_seeds_protocol_runs():
  out = F.cell_overrides("ft_dense", 600, seed=1, workdir="DIR")
  assert out["train.init_from"] == "DIR/dense_s1"
  assert out["moe.num_experts"] == 0 and out["data.name"] == "kjv_books"
  assert out["train.num_steps"] == 600 // F.FT_FRACTION
  out = F.cell_overrides("ft_only_moe", 600, seed=2, workdir="DIR")
  assert out["train.init_from"] == "DIR/switch_s2"
  assert out["train.freeze"] == "non_experts"  # only the MoE layers train


def test_report_lines_of_the_finetuning_findings():
  from switchjax import repro_report
  runs = {}
  for s in SEEDS:
    runs[("dense", s)] = runs[("switch", s)] = F.Run(eval_loss=4.8)
    for cell, v, em in (("ft_dense", 3.0, 0.1), ("ft_switch", 3.2, 0.2),
                        ("ft_switch_ed", 3.1 + 0.01 * s, 0.3),
                        ("ft_only_moe", 3.5 + 0.01 * s, 0.0),
                        ("ft_only_non_moe", 3.2 + 0.01 * s, 0.25)):
      runs[(cell, s)] = F.Run(eval_loss=v, late_train_loss=2.5, exact_match=em)
  results = {"i": F.analyse_i(runs, SEEDS, {"switch": 100.0,
                                             "freeze_non_experts": 50.0}),
             "k": F.analyse_k(runs, SEEDS), "l": F.analyse_l(runs, SEEDS)}
  text = "\n".join(repro_report._finetuning_lines(results))
  assert "gap dense +0.5000, Switch +0.7000" in text
  assert "exact match dense 10.0 %, Switch 20.0 %" in text
  assert "at 0.4 30.0 %" in text
  assert "all but MoE 25.0 %" in text
  assert "all 100 (1.00x), only MoE 50 (0.50x)" in text
