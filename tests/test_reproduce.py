"""scripts/reproduce.py end to end on a shrunken protocol, the fixed eval set,
and the routing probe against the model's own expert loads."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import experiment, script
from switchjax import findings as F
from switchjax import routing_probe
from switchjax import train
from switchjax import validate
from switchjax.data import pipeline
from switchjax.data import vocab as vocab_lib

TINY = ["--set", "train.num_steps=2", "--set", "train.warmup_steps=0",
        "--set", "train.eval_steps=1", "--set", "train.batch_size=16", "--set", "model.num_decoder_layers=2",
        "--set", "model.d_model=32", "--set", "model.d_ff=64"]


def test_bad_arguments_fail_in_one_line(capsys):
  reproduce = script("reproduce")
  for argv, what in ((["--findings", "a,z"], "--findings"),
                     (["--seeds", "1"], "--seeds"),
                     (["--seeds", "1,x"], "--seeds"),
                     (["--set", "nokey"], "--set"),
                     (["--jobs", "-1"], "--jobs")):
    with pytest.raises(SystemExit) as e:
      reproduce.main(argv)
    assert e.value.code == 2
    assert what in capsys.readouterr().err.strip().splitlines()[-1]


def test_unknown_set_key_is_refused_before_training(tmp_path):
  reproduce = script("reproduce")
  with pytest.raises(SystemExit, match="unknown config key 'model.d_modl'"):
    reproduce.main(["--findings", "a", "--workdir", str(tmp_path / "w"),
                    "--set", "model.d_modl=3"])
  assert not os.path.exists(tmp_path / "w")


def _reproduce_grid(findings, seeds, settings=()):
  reproduce = script("reproduce")
  return reproduce, reproduce.make_grid(findings, list(seeds), list(settings))


def test_grid_orders_runs_and_doubles_dense_2x():
  _, g = _reproduce_grid(["a", "b", "f"], (0, 1), [("train.num_steps", 100)])
  names = [n for n, _ in g.cells]
  assert names[:4] == ["dense_s0", "switch_s0", "dense_s1", "switch_s1"]
  assert names[4:8] == ["e2_s0", "e32_s0", "e2_s1", "e32_s1"]
  # (b)'s second tier after every finding's first: f's stress runs.
  assert names[-6:-2] == ["e4_s0", "e16_s0", "e4_s1", "e16_s1"]
  assert names[-2:] == ["dense_2x_s0", "dense_2x_s1"]  # the long runs last
  cells = dict(g.cells)
  assert cells["dense_2x_s1"]["train.num_steps"] == 200
  assert cells["dense_2x_s1"]["seed"] == 1
  stress = cells[F.run_name(F.stress_cell("bfloat16", 0.1, 0.01), 0)]
  assert stress["train.num_steps"] == 20 and stress["model.dtype"] == "bfloat16"
  assert cells["switch_s0"] == {"train.num_steps": 100, "seed": 0}


def test_upcycling_runs_start_from_their_seeds_dense_run_after_it():
  reproduce = script("reproduce")
  g = reproduce.make_grid(["h"], [0, 1], [("train.num_steps", 100)],
                          workdir="DIR")
  names = [n for n, _ in g.cells]
  assert names[:4] == ["dense_s0", "top2_s0", "dense_s1", "top2_s1"]
  cells = dict(g.cells)
  assert cells["upcycled_s1"]["train.upcycle_from"] == os.path.join("DIR", "dense_s1")
  assert cells["dense_cont_s0"]["train.init_from"] == os.path.join("DIR", "dense_s0")
  assert cells["upcycled_s0"]["train.num_steps"] == 50
  assert cells["upcycled_s0"]["moe.num_selected"] == 2
  # The protocol phase alone holds no started run, the started phase only them.
  started = reproduce.make_grid(["h"], [0, 1], [], "started", "DIR")
  assert [n for n, _ in started.cells] == [
      "dense_cont_s0", "upcycled_s0", "dense_cont_s1", "upcycled_s1"]
  protocol = reproduce.make_grid(["h"], [0, 1], [], "protocol", "DIR")
  assert not {n for n, _ in protocol.cells} & {n for n, _ in started.cells}


def _fake_run(run_dir, config, losses):
  """A finished run on disk: config, metrics (evals at `losses`), step dir."""
  os.makedirs(os.path.join(run_dir, "checkpoints", str(config.train.num_steps)))
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    f.write(config.to_json())
  steps = np.linspace(0, config.train.num_steps, len(losses) + 1)[1:]
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for step, loss in zip(steps, losses):
      row = {"step": int(step), "loss": loss + 0.1, "dropped_fraction": 0.01,
             "tokens_per_sec": 1000.0, "grad_norm": 1.0, "z_loss": 2.0}
      f.write(json.dumps(row) + "\n")
      f.write(json.dumps({"step": int(step), "split": "eval", "loss": loss,
                          "dropped_fraction": 0.0}) + "\n")


def test_report_only_reads_runs_into_findings(tmp_path, capsys):
  from switchjax import sweep
  wd = str(tmp_path / "repro")
  final = {"dense": [5.0, 5.1, 5.2], "switch": [4.9, 4.95, 5.0],
           "dense_2x": [4.8, 4.8, 4.8]}
  reproduce, g = _reproduce_grid(["a"], (0, 1, 2))
  for cell, config in sweep.prepare(g, None):
    name, _, seed = cell.name.rpartition("_s")
    _fake_run(os.path.join(wd, cell.name), config,
              [6.0, final[name][int(seed)]])
  reproduce.main(["--findings", "a", "--workdir", wd, "--report_only"])
  with open(os.path.join(wd, "findings.json")) as f:
    a = json.load(f)["a"]
  assert a["per_seed_difference"] == pytest.approx([-0.1, -0.15, -0.2])
  assert a["verdict"] == "agrees" and a["seeds"] == [0, 1, 2]
  # Switch halfway (in loss) between dense at 1x and 2x: sqrt(2) x tokens.
  assert a["speedup"]["tokens"] == pytest.approx([2 ** 0.5] * 3)
  report = open(os.path.join(wd, "results.md")).read()
  assert "| (a) |" in report and "**agrees**" in report
  assert "1.41x the tokens" in report
  assert os.path.exists(os.path.join(wd, "loss_vs_tokens.png"))
  assert "specialisation skipped" in capsys.readouterr().out  # no checkpoint


def test_other_seeds_in_the_workdir_replicate_the_verdict(tmp_path):
  """Seeds 0-2 agree; seeds 3, 4 trained there too (a rerun with --seeds
  3,4) split, so on them (a) is inconclusive, and pooled over 5 too: the
  verdict the finding then reports."""
  from switchjax import sweep
  wd = str(tmp_path / "repro")
  dense = [5.0] * 5
  switch = [4.9, 4.88, 4.86, 4.9, 5.1]  # differences -.1 -.12 -.14 -.1 +.1
  reproduce, g = _reproduce_grid(["a"], (0, 1, 2, 3, 4))
  for cell, config in sweep.prepare(g, None):
    name, _, seed = cell.name.rpartition("_s")
    if name in ("dense", "switch"):
      value = {"dense": dense, "switch": switch}[name][int(seed)]
      _fake_run(os.path.join(wd, cell.name), config, [6.0, value])
  reproduce.main(["--findings", "a", "--workdir", wd, "--report_only"])
  with open(os.path.join(wd, "findings.json")) as f:
    a = json.load(f)["a"]
  made = a["replication"]["made_with"]
  assert made["seeds"] == [0, 1, 2] and made["verdict"] == "agrees"
  assert made["per_seed_difference"] == pytest.approx([-0.1, -0.12, -0.14])
  other, pooled = a["replication"]["other_seeds"], a["replication"]["all_seeds"]
  # The headline is the verdict on every seed the workdir holds.
  for k in ("seeds", "values", "per_seed_difference", "mean_difference",
            "interval_95", "verdict"):
    assert a[k] == pooled[k], k
  assert other["seeds"] == [3, 4]
  assert other["per_seed_difference"] == pytest.approx([-0.1, 0.1])
  assert other["mean_difference"] == pytest.approx(0.0, abs=1e-9)
  assert other["verdict"] == "inconclusive"
  diffs = np.array([-0.1, -0.12, -0.14, -0.1, 0.1])
  half = 2.7764451051977987 * diffs.std(ddof=1) / np.sqrt(5)  # t(.975, 4)
  assert pooled["seeds"] == [0, 1, 2, 3, 4]
  assert pooled["interval_95"] == pytest.approx([diffs.mean() - half,
                                                 diffs.mean() + half])
  assert diffs.mean() + half > 0 and pooled["verdict"] == "inconclusive"
  report = open(os.path.join(wd, "results.md")).read()
  assert "## On other seeds" in report
  assert "| (a) | other: 3, 4 | -0.1000, +0.1000 |" in report
  assert "| (a) | made with: 0, 1, 2 | -0.1000, -0.1200, -0.1400 |" in report
  assert "(seeds 0, 1, 2, 3, 4) |" in report  # the findings table's row
  sd = diffs.std(ddof=1)
  power = a["replication"]["power"]
  assert power["sd"] == pytest.approx(sd) and power["seeds"] == 3
  assert power["effect"] == pytest.approx(diffs.mean())
  assert power["half_width"] == pytest.approx(4.302652729911275 * sd
                                              / np.sqrt(3))
  # A pooled effect of under half its sd: 3 new seeds seldom resolve it.
  assert 0.025 < power["resolve_probability"] < 0.2
  assert power["seeds_for_90_percent"] > 20
  assert (f"mean {diffs.mean():+.4f} and sd {sd:.4f}. If per-seed "
          "differences are normal with these, a rerun on 3 new seeds has a "
          f"half-width of {power['half_width']:.4f} and gives **agrees** "
          f"with probability {power['resolve_probability']:.2f}") in report


def test_dense_2x_trains_only_if_switch_beats_dense(tmp_path, capsys,
                                                   monkeypatch):
  from switchjax import sweep
  from switchjax import train as train_lib

  def must_not_train(config, workdir):
    raise AssertionError(f"trained {workdir}")

  monkeypatch.setattr(train_lib, "train_and_evaluate", must_not_train)
  wd = str(tmp_path / "repro")
  final = {"dense": [5.0, 5.1, 5.2], "switch": [5.1, 5.15, 5.2]}
  reproduce, g = _reproduce_grid(["a"], (0, 1, 2))
  for cell, config in sweep.prepare(g, None):
    name, _, seed = cell.name.rpartition("_s")
    if name in final:
      _fake_run(os.path.join(wd, cell.name), config,
                [6.0, 5.5, final[name][int(seed)]])
  reproduce.main(["--findings", "a", "--workdir", wd])
  assert "dense_2x not trained" in capsys.readouterr().out
  with open(os.path.join(wd, "findings.json")) as f:
    up = json.load(f)["a"]["speedup"]
  assert up["bound"] == ["upper"] * 3
  # Dense's curve: 5.5 at 2/3 T, 5.0 at T; Switch's 5.1 is four fifths of
  # the way down in loss, so in log tokens: T (2/3)^0.2.
  assert up["tokens"][0] == pytest.approx((2 / 3) ** 0.2)
  assert up["tokens"][2] == pytest.approx(1.0)  # a tie: at T


def test_finding_e_trains_resumably(tmp_path):
  """Real training, shrunken: finding (e)'s encoder-decoder cells, two at a
  time in worker processes (the default on a CPU host with 2 cores)."""
  reproduce = script("reproduce")
  wd = str(tmp_path / "repro")
  argv = ["--findings", "e", "--seeds", "0,1", "--workdir", wd,
          "--jobs", "2"] + TINY
  reproduce.main(argv)
  with open(os.path.join(wd, "findings.json")) as f:
    e = json.load(f)["e"]
  assert e["cells"] == ["ed_ec", "ed_top2"] and e["seeds"] == [0, 1]
  diffs = [a - b for a, b in zip(e["values"]["ed_ec"], e["values"]["ed_top2"])]
  assert e["per_seed_difference"] == pytest.approx(diffs)
  with open(os.path.join(wd, "ed_ec_s1", "config.json")) as f:
    config = json.load(f)
  assert config["moe"]["encoder_router"] == "expert_choice"
  assert config["seed"] == 1 and config["model"]["d_model"] == 32
  with open(os.path.join(wd, "timing.jsonl")) as f:
    timing = [json.loads(line) for line in f]
  # Four runs and the wall time of the four together.
  assert [t.get("jobs") for t in timing] == [2] * 5
  assert sorted(t.get("cell", "") for t in timing) == [
      "", "ed_ec_s0", "ed_ec_s1", "ed_top2_s0", "ed_top2_s1"]
  # A rerun trains nothing and reports the same numbers.
  reproduce.main(argv)
  with open(os.path.join(wd, "timing.jsonl")) as f:
    assert len(f.readlines()) == 5
  with open(os.path.join(wd, "findings.json")) as f:
    assert json.load(f)["e"]["values"] == e["values"]


def _repro(preset="switch", **overrides):
  c = experiment(os.path.join("experiments", "repro", "protocol.py"), preset)
  c.train.batch_size = 8  # the tests' 8 CPU devices split the batch
  for k, v in overrides.items():
    section, key = k.split("__")
    c[section][key] = v
  return validate.prepare(c)


@pytest.mark.parametrize("preset", ["switch", "encdec"])
def test_two_seeds_score_the_same_tokens(preset):
  batches = []
  for seed in (0, 1):
    c = _repro(preset)
    c.seed = seed
    it = pipeline.make_iterator(c, "validation", batch_size=8)
    batches.append([next(it) for _ in range(3)])
  for b0, b1 in zip(*batches):
    for k in b0:
      np.testing.assert_array_equal(b0[k], b1[k])


def test_eval_steps_zero_reads_the_whole_split_once():
  c = _repro()
  vocab = vocab_lib.get_vocabulary(c)
  from switchjax.data import tfds_corpus
  src = tfds_corpus.data_source("bundled", "validation", None)
  total = sum(vocab.encode_np(src[i]["text"], append_eos=True).size
              for i in range(len(src)))
  n = train.eval_batches(c)
  per_batch = c.train.batch_size * (c.data.seq_length + 1)
  assert n * per_batch <= total < (n + 1) * per_batch
  # Two processes: the smaller slice of documents decides.
  assert pipeline.num_batches(c, "validation",
                              batch_size=c.train.batch_size // 2,
                              process_count=2) <= n


def test_probe_counts_match_the_models_expert_load(tmp_path):
  """Top-1 first choices of the probe = the eval's dispatched load when the
  eval capacity drops nothing (factor E)."""
  c = _repro(model__num_decoder_layers=2, model__d_model=32, model__d_ff=64)
  c.moe.eval_capacity_factor = float(c.moe.num_experts)
  c.train.num_steps, c.train.warmup_steps = 2, 0
  c.train.eval_steps, c.train.checkpoint_every = 1, 2
  wd = str(tmp_path / "run")
  train.train_and_evaluate(c, wd)
  p = routing_probe.probe(c, wd, max_batches=1)
  assert p.layers == ["decoder/layer_1"] and p.tokens.size == 8 * 128
  assert 0.0 <= p.bf16_mismatch[0] <= 1.0
  trainer = train.make_trainer(c)
  from switchjax import checkpoint
  ck = checkpoint.Checkpointer(wd, max_to_keep=5, log=None)
  _, state = ck.restore_latest(trainer.abstract_state,
                               pipeline.make_iterator(c, "train", batch_size=8))
  ck.close()
  examples, _ = routing_probe.validation_examples(c)
  batch = {"decoder_input_tokens": examples[:8, :-1],
           "decoder_target_tokens": examples[:8, 1:],
           "decoder_loss_weights": np.ones((8, 128), np.float32)}
  m = jax.device_get(trainer.eval_step(state["params"],
                                       train._global_batch(trainer, batch)))
  load = m["layers"]["decoder/layer_1"]["expert_load"]
  counts = np.bincount(p.choice[0], minlength=c.moe.num_experts)
  np.testing.assert_allclose(counts / counts.sum(), load, atol=1e-6)
  fr = routing_probe.domain_fractions(p, c.moe.num_experts)
  np.testing.assert_allclose(fr.sum(-1)[0][counts > 0], 1.0)


def test_protocol_vocabulary_is_the_bundled_2k_model():
  c = _repro()
  path = vocab_lib.resolve_path(c.data.vocab_path)
  assert os.path.dirname(path) == os.path.dirname(vocab_lib.BUNDLED_VOCAB_PATH)
  vocab = vocab_lib.get_vocabulary(c)
  assert vocab.sp_vocab_size == 2048 and vocab.vocab_size == c.model.vocab_size
  assert vocab_lib.resolve_path("") == vocab_lib.BUNDLED_VOCAB_PATH
  assert vocab_lib.resolve_path("no/such.model").endswith("no/such.model")


def test_publishing_one_finding_keeps_the_others(tmp_path, monkeypatch):
  """(h) alone into a docs/ that holds (a): (a) and its figure stay."""
  from switchjax import sweep
  reproduce = script("reproduce")
  docs = tmp_path / "docs"
  (docs / "results").mkdir(parents=True)
  published_a = {"id": "a", "verdict": "inconclusive", "claim": "x",
                 "seeds": [0], "values": {}, "difference": "d",
                 "per_seed_difference": [0.1], "mean_difference": 0.1,
                 "interval_95": [-1.0, 1.0], "paper_sign": -1}
  (docs / "results" / "findings.json").write_text(json.dumps({"a": published_a}))
  (docs / "results" / "loss_vs_tokens.png").write_bytes(b"old figure")
  (docs / "results.md").write_text("# r\n\nMade by `old command` on d at "
                                   "commit `abc`; more\n")
  monkeypatch.setattr(reproduce, "DOCS", str(docs))
  wd = str(tmp_path / "repro")
  final = {"dense": [5.0, 5.1], "top2": [4.9, 5.0],
           "dense_cont": [4.9, 5.0], "upcycled": [4.8, 4.85]}
  g = reproduce.make_grid(["h"], [0, 1], [], workdir=wd)
  for cell, config in sweep.prepare(g, None):
    name, _, seed = cell.name.rpartition("_s")
    _fake_run(os.path.join(wd, cell.name), config,
              [6.0, final[name][int(seed)]])
  # The specialisation probe reads (a)'s Switch run: kept with (a), not
  # replaced by the one of this workdir (another run of that seed).
  spec = json.loads(open(os.path.join(reproduce.ROOT, "docs", "results",
                                      "specialisation.json")).read())
  (docs / "results" / "specialisation.json").write_text(json.dumps(spec))
  with open(os.path.join(wd, "specialisation.json"), "w") as f:
    json.dump(dict(spec, run="other_s0"), f)
  reproduce.main(["--findings", "h", "--seeds", "0,1", "--workdir", wd,
                  "--report_only", "--publish"])
  assert json.loads((docs / "results" / "specialisation.json").read_text()
                    ) == spec
  merged = json.loads((docs / "results" / "findings.json").read_text())
  assert list(merged) == ["a", "h"]
  assert merged["a"] == {**published_a,
                         "made_by": "`old command` on d at commit `abc`"}
  assert merged["h"]["per_seed_difference"] == pytest.approx([-0.1, -0.15])
  assert merged["h"]["values"]["dense"] == pytest.approx([5.0, 5.1])
  assert (docs / "results" / "loss_vs_tokens.png").read_bytes() == b"old figure"
  report = (docs / "results.md").read_text()
  assert "| (a) |" in report and "| (h) |" in report
  assert "Findings (a) are as published before" in report
  assert "made by `old command` on d at commit `abc`" in report
  assert "**Upcycling (h)**" in report
  assert "](results/loss_vs_tokens.png)" in report
  # Published again, (a) still names where it was made, not the last run.
  reproduce.main(["--findings", "h", "--seeds", "0,1", "--workdir", wd,
                  "--report_only", "--publish"])
  assert "made by `old command` on d at commit `abc`" in (
      docs / "results.md").read_text()
