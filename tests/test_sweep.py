"""Sweeps: grid expansion, a micro grid end to end, skip / resume, commands."""
import csv
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import jax
import pytest

from switchjax import grid
from switchjax import results
from switchjax import sweep
from switchjax import validate


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = sorted(glob.glob(os.path.join(ROOT, "experiments", "ablations", "*.py")))

M, H, E = 32, 64, 8  # the micro model: d_model, d_ff, experts


# A grid file: two cells (a top-1 MoE and the dense baseline) of a shrunk model.
MICRO_GRID = """
from switchjax import grid


def get_config(arg=None):
  cells = (arg or "cf1.0").split(",")
  g = grid.base_grid("micro", "experiments/switch_base.py", "tiny")
  # Decoder-only: half the layers of the encoder-decoder, half the compiling.
  g.overrides.model = {{"arch": "decoder_only", "d_model": {M},
                       "num_heads": 2, "head_dim": 16, "d_ff": {H},
                       "dropout_rate": 0.0}}
  g.overrides.data = {{"seq_length": 32}}
  g.overrides.train = {{"batch_size": 8, "num_steps": 3, "log_every": 1,
                       "eval_every": 3, "eval_steps": 1, "checkpoint_every": 2}}
  g.overrides.moe = {{"group_size": 64, "num_experts": {E}}}
  g.axes = (grid.axis("moe.train_capacity_factor",
                      [float(c[2:]) for c in cells], label="cf"),)
  g.cells = grid.variants(dense={{"moe.num_experts": 0}})
  g.x_axis = "moe.train_capacity_factor"
  g.loss_threshold = 100.0  # every logged loss is below: reached at step 1
  return g
""".format(M=M, H=H, E=E)


def micro_grid(cells="cf1.0"):
  namespace = {}
  exec(MICRO_GRID, namespace)  # pylint: disable=exec-used
  return namespace["get_config"](cells)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------
# Grid definitions (no training).


def test_product_zipped_and_extra_cells():
  g = grid.base_grid("g", "experiments/switch_base.py", "tiny")
  g.axes = (grid.zipped(("moe.router", "moe.num_selected"),
                        [("switch", 1), ("gshard", 2)], labels=("top1", "top2")),
            grid.axis("moe.train_capacity_factor", (1.0, 2.0), label="cf"))
  g.cells = grid.variants(dense={"moe.num_experts": 0})
  cells = grid.expand(g)
  assert [c.name for c in cells] == [
      "top1_cf1.0", "top1_cf2.0", "top2_cf1.0", "top2_cf2.0", "dense"]
  assert cells[2].overrides == {"moe.router": "gshard", "moe.num_selected": 2,
                                "moe.train_capacity_factor": 1.0}
  assert cells[-1].is_extra and not cells[0].is_extra
  configs = dict((c.name, cfg) for c, cfg in grid.cell_configs(g))
  assert configs["top2_cf2.0"].moe.router == "gshard"
  assert configs["top2_cf2.0"].moe.train_capacity_factor == 2.0
  assert configs["dense"].moe.num_experts == 0
  assert configs["dense"].moe.router == "switch"  # the experiment's own value


@pytest.mark.parametrize("mutate,message", [
    (lambda g: setattr(g, "axes", (grid.axis("moe.num_experst", (2, 4)),)),
     "unknown config key 'moe.num_experst'"),
    (lambda g: setattr(g, "axes", (grid.axis("moe", (2, 4)),)),
     "unknown config key 'moe'"),
    (lambda g: setattr(g, "cells", grid.variants(x={"train.num_steps": "many"})),
     "bad value 'many' for 'train.num_steps'"),
    (lambda g: setattr(g, "cells", grid.variants(a={}, **{"a b": {}})),
     "not a plain directory name"),
    (lambda g: setattr(g, "axes", (grid.axis("seed", (1, 1)),)),
     "two cells are named 'seed=1'"),
    (lambda g: (setattr(g, "axes", ()), setattr(g, "cells", ())), "no cells"),
])
def test_bad_grids_raise_clear_errors(mutate, message):
  g = grid.base_grid("bad", "experiments/switch_base.py", "tiny")
  g.cells = grid.variants(a={"seed": 1})
  mutate(g)
  with pytest.raises(ValueError, match=message):
    grid.cell_configs(g)


def test_bad_axis_key_stops_the_sweep_before_training(tmp_path, monkeypatch):
  g = micro_grid()
  g.axes = (grid.axis("moe.capacity_factor", (1.0, 2.0)),)
  monkeypatch.setattr(sweep, "_train", _must_not_train)
  with pytest.raises(ValueError, match="cell 'capacity_factor=1.0': "
                     "unknown config key 'moe.capacity_factor'"):
    sweep.run(g, str(tmp_path / "sweep"))
  assert not os.path.exists(tmp_path / "sweep")


def test_cell_the_trainer_refuses_is_reported_before_training(tmp_path,
                                                              monkeypatch):
  g = micro_grid()
  g.cells = grid.variants(bad={"moe.group_size": 100})  # divides no batch
  monkeypatch.setattr(sweep, "_train", _must_not_train)
  with pytest.raises(ValueError, match="cell 'bad': moe.group_size=100"):
    sweep.run(g, str(tmp_path / "sweep"))


@pytest.mark.parametrize("path", GRIDS, ids=os.path.basename)
@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_ablation_grids_validate(path, preset):
  g = grid.load_grid(f"{path}:{preset}")
  assert g.preset == preset
  cells = grid.cell_configs(g)
  assert len(cells) >= 4
  for cell, config in cells:
    if preset == "full":
      assert config.data.name.startswith("c4")
      config.data.name = "bundled"  # C4 is not prepared here; the rest is
    validate.prepare(config)  # raises on anything the trainer would refuse
    grid.check_x_axis(g, config)
    if preset == "tiny":
      assert config.train.num_steps <= 300, cell.name


def test_num_experts_grid_keeps_active_flops_equal():
  from switchjax import model
  cells = grid.cell_configs(grid.load_grid(
      os.path.join(ROOT, "experiments/ablations/num_experts.py:tiny")))
  experts = [c.moe.num_experts for _, c in cells]
  assert experts == [0, 2, 4, 8, 16, 32]
  counts = {c.moe.num_experts: model.param_counts(validate.prepare(c))
            for _, c in cells}
  dense_total, dense_active = counts[0]
  assert dense_total == dense_active
  sparse_layers = 2  # one per stack (2 + 2 layers, every second sparse)
  d_model = cells[0][1].model.d_model
  for n in experts[1:]:
    total, active = counts[n]
    # Top-1 over experts as wide as the dense FFN: the active parameters
    # are the dense model's plus the router's M x E weights.
    assert active - dense_active == sparse_layers * d_model * n
    assert total > active


def test_capacity_factor_grid_cells():
  by_name = {cell.name: config for cell, config in grid.cell_configs(
      grid.load_grid(os.path.join(
          ROOT, "experiments/ablations/capacity_factor.py:tiny")))}
  for k, router in (("top1", "switch"), ("top2", "gshard")):
    for cf in (1.0, 1.25, 2.0):
      config = by_name[f"{k}_cf{cf}"]
      assert config.moe.router == router
      assert config.moe.train_capacity_factor == cf
  assert by_name["dense"].moe.num_experts == 0


# ---------------------------------------------------------------------------
# The micro sweep end to end.


def _must_not_train(config, workdir):
  raise AssertionError(f"trained {workdir} although it was finished")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep") / "micro")
  rows = sweep.run(micro_grid(), workdir)
  return workdir, rows


def test_sweep_writes_table_and_plots(finished_sweep):
  workdir, rows = finished_sweep
  table = read_csv(os.path.join(workdir, "results.csv"))
  assert [r["cell"] for r in table] == ["cf1.0", "dense"]
  assert [r["cell"] for r in rows] == ["cf1.0", "dense"]
  for r in table:
    assert r["status"] == "done" and r["steps"] == "3"
    metrics = read_jsonl(os.path.join(workdir, r["cell"], "metrics.jsonl"))
    train = [m for m in metrics if "split" not in m]
    evals = [m for m in metrics if m.get("split") == "eval"]
    assert float(r["train_loss"]) == pytest.approx(train[-1]["loss"])
    assert float(r["eval_loss"]) == pytest.approx(evals[-1]["loss"])
    # Last quarter of 3 logged steps: the last one.
    assert float(r["dropped_pct"]) == pytest.approx(
        100 * train[-1]["dropped_fraction"])
    assert r["steps_to_threshold"] == "1"
  moe, dense = table
  assert moe["series"] == "" and float(moe["x"]) == 1.0
  assert dense["series"] == "dense" and dense["x"] == ""
  # Total minus active: 7 of 8 gated-GELU experts (3 M x H matrices each)
  # idle per token in the one sparse layer.
  assert (int(moe["params_total"]) - int(moe["params_active"])
          == (E - 1) * 3 * M * H)
  assert dense["params_total"] == dense["params_active"]
  assert float(dense["dropped_pct"]) == 0.0
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| cf1.0 |" in md and "| dense |" in md
  assert "steps to loss 100" in md
  curves = read_csv(os.path.join(workdir, "curves.csv"))
  assert len([c for c in curves if c["cell"] == "dense"]) == 4  # 3 train + 1 eval
  loads = json.load(open(os.path.join(workdir, "expert_load.json")))
  assert loads["dense"] == {}
  assert sorted(loads["cf1.0"]) == ["decoder/layer_1"]
  for load in loads["cf1.0"].values():
    assert len(load) == E and sum(load) == pytest.approx(1.0, abs=1e-5)
  for png in ("loss_curves.png", "final_vs_train_capacity_factor.png",
              "expert_load.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
  # load() gives back what write() wrote.
  back, back_curves, back_loads = results.load(workdir)
  assert [r["cell"] for r in back] == ["cf1.0", "dense"]
  assert back[0]["eval_loss"] == pytest.approx(rows[0]["eval_loss"])
  assert len(back_curves) == len(curves) and back_loads == loads


def test_rerun_skips_finished_cells(finished_sweep, monkeypatch):
  workdir, rows = finished_sweep
  from switchjax import train
  monkeypatch.setattr(train, "train_and_evaluate", _must_not_train)
  # Unless one is set (conftest sets one), the sweep caches compiled
  # programs in DIR/xla_cache; an explicit one is kept.
  suite_cache = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", "")
    again = sweep.run(micro_grid(), workdir)
    assert jax.config.jax_compilation_cache_dir == os.path.join(
        workdir, "xla_cache")
    jax.config.update("jax_compilation_cache_dir", "/elsewhere")
    sweep.run(micro_grid(), workdir)
    assert jax.config.jax_compilation_cache_dir == "/elsewhere"
  finally:
    jax.config.update("jax_compilation_cache_dir", suite_cache)
  for a, b in zip(rows, again):
    assert a["eval_loss"] == b["eval_loss"] and b["status"] == "done"


def test_finished_cell_of_an_older_schema_counts_other_config_refused(
    finished_sweep, tmp_path, monkeypatch):
  source, _ = finished_sweep
  workdir = str(tmp_path / "micro")
  shutil.copytree(source, workdir)
  path = os.path.join(workdir, "dense", "config.json")
  saved = json.load(open(path))
  # Made before the schema had moe.router_dtype, and before dispatch 'fast'
  # was renamed 'gather': still this experiment.
  older = json.loads(json.dumps(saved))
  del older["moe"]["router_dtype"]
  assert older["moe"]["dispatch"] == "gather"
  older["moe"]["dispatch"] = "fast"
  json.dump(older, open(path, "w"))
  monkeypatch.setattr(sweep, "_train", _must_not_train)
  assert [r["status"] for r in sweep.run(micro_grid(), workdir)] == [
      "done", "done"]
  # A different value of a key both have: another experiment.
  saved["moe"]["router_jitter"] = 0.5
  json.dump(saved, open(path, "w"))
  with pytest.raises(ValueError, match="cell 'dense': .* holds a finished run "
                     r"of another config \(differs in: moe.router_jitter\)"):
    sweep.run(micro_grid(), workdir)


def test_interrupted_cell_resumes(finished_sweep, tmp_path, monkeypatch):
  source, rows = finished_sweep
  workdir = str(tmp_path / "micro")
  shutil.copytree(source, workdir)
  # As if killed after step 2's checkpoint: step 3 never saved or logged.
  cell = os.path.join(workdir, "cf1.0")
  shutil.rmtree(os.path.join(cell, "checkpoints", "3"))
  lines = open(os.path.join(cell, "metrics.jsonl")).readlines()
  with open(os.path.join(cell, "metrics.jsonl"), "w") as f:
    f.writelines(l for l in lines if json.loads(l)["step"] <= 2)
  from switchjax import train
  calls = []
  real = train.train_and_evaluate

  def recording(config, workdir):
    calls.append(os.path.basename(workdir))
    return real(config, workdir)
  monkeypatch.setattr(train, "train_and_evaluate", recording)
  again = sweep.run(micro_grid(), workdir)
  assert calls == ["cf1.0"]  # dense was finished
  metrics = read_jsonl(os.path.join(cell, "metrics.jsonl"))
  assert [m["step"] for m in metrics if "split" not in m] == [1, 2, 3]
  assert again[0]["status"] == "done"
  # Resumed from step 2, it ends where the uninterrupted run ended.
  assert again[0]["train_loss"] == pytest.approx(rows[0]["train_loss"],
                                                 rel=1e-5)


def test_diverged_cell_is_recorded_and_not_retried(tmp_path, monkeypatch):
  workdir = str(tmp_path / "micro")

  def diverging(config, cell_dir):
    os.makedirs(cell_dir, exist_ok=True)
    raise FloatingPointError("loss is nan at step 2")
  monkeypatch.setattr(sweep, "_train", diverging)
  g = micro_grid()
  g.cells = ()
  rows = sweep.run(g, workdir)
  assert rows[0]["status"] == "diverged"
  assert "nan" in results.diverged(os.path.join(workdir, "cf1.0"))["error"]
  monkeypatch.setattr(sweep, "_train", _must_not_train)
  assert sweep.run(g, workdir)[0]["status"] == "diverged"


def test_preempted_cell_stops_the_sweep(tmp_path, monkeypatch):
  trained = []

  def preempted(config, cell_dir):
    trained.append(os.path.basename(cell_dir))
    return {"preempted": "SIGTERM"}  # saved a step and returned early
  monkeypatch.setattr(sweep, "_train", preempted)
  rows = sweep.run(micro_grid(), str(tmp_path / "micro"))
  assert trained == ["cf1.0"]  # dense never started
  assert [r["status"] for r in rows] == ["not started", "not started"]


# ---------------------------------------------------------------------------
# The command line.


def _parse_main_flags(argv):
  """The config `python -m switchjax.main argv` would train."""
  fv = flags.FlagValues()
  argv = ["main"] + argv
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return fv.config, fv.workdir


def test_print_commands_reproduce_each_cell(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)  # the commands name experiments/ relative to it
  path = tmp_path / "micro_grid.py"
  path.write_text(MICRO_GRID)
  out = subprocess.run(
      [sys.executable, "-m", "switchjax.sweep", f"--config={path}:cf1.0,cf2.0",
       "--workdir=/runs/sweep dir", "--print_commands"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  lines = out.strip().splitlines()
  expected = grid.cell_configs(grid.load_grid(f"{path}:cf1.0,cf2.0"))
  assert len(lines) == len(expected) == 3
  for line, (cell, config) in zip(lines, expected):
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "switchjax.main"]
    parsed, workdir = _parse_main_flags(argv[3:])
    assert workdir == f"/runs/sweep dir/{cell.name}"
    assert parsed.to_dict() == config.to_dict(), cell.name
  assert not os.path.exists("/runs/sweep dir")


def test_cli_bad_key_exits_with_one_line(tmp_path):
  path = tmp_path / "bad_grid.py"
  path.write_text(MICRO_GRID.replace(
      "  return g", '  g.axes = (grid.axis("moe.expertz", (1, 2)),)\n  return g'))
  proc = subprocess.run(
      [sys.executable, "-m", "switchjax.sweep", f"--config={path}",
       f"--workdir={tmp_path / 'w'}"],
      cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: grid 'micro' cell 'expertz=1': unknown config key 'moe.expertz'")
  assert not os.path.exists(tmp_path / "w")


# ---------------------------------------------------------------------------
# Cells side by side (--jobs).


def test_cells_side_by_side_train_as_one_after_another(finished_sweep,
                                                       tmp_path):
  _, rows = finished_sweep
  workdir = str(tmp_path / "micro")
  again = sweep.run(micro_grid(), workdir, jobs=2)
  assert [r["cell"] for r in again] == ["cf1.0", "dense"]
  for a, b in zip(rows, again):
    assert b["status"] == "done"
    # One core per worker instead of the suite's threads: the same
    # program, so equal up to the order of float32 sums.
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    log = open(os.path.join(workdir, b["cell"], "train.log")).read()
    assert "parameters:" in log  # the worker's output went to the cell
  lines = read_jsonl(os.path.join(workdir, "timing.jsonl"))
  cells = [l for l in lines if "cell" in l]
  walls = [l for l in lines if "sweep" in l]
  assert sorted(l["cell"] for l in cells) == ["cf1.0", "dense"]
  assert all(l["jobs"] == 2 and not l["resumed"] for l in cells)
  assert [w["sweep"] for w in walls] == ["micro"] and walls[0]["jobs"] == 2
  # The measured total is the wall time, not the overlapping cell times.
  assert sweep.wall_hours(workdir) == pytest.approx(walls[0]["seconds"] / 3600)
  assert walls[0]["seconds"] < sum(l["seconds"] for l in cells) + 60


def test_wall_hours_counts_one_job_cells_and_parallel_sweeps(tmp_path):
  lines = [{"cell": "a", "seconds": 3600, "resumed": False},  # before jobs
           {"cell": "b", "seconds": 1800, "resumed": True, "jobs": 1},
           {"cell": "c", "seconds": 7200, "resumed": False, "jobs": 2},
           {"cell": "d", "seconds": 7200, "resumed": False, "jobs": 2},
           {"sweep": "g", "seconds": 9000, "jobs": 2}]
  with open(tmp_path / "timing.jsonl", "w") as f:
    f.writelines(json.dumps(l) + "\n" for l in lines)
  assert sweep.wall_hours(str(tmp_path)) == pytest.approx(1 + 0.5 + 2.5)
  assert sweep.wall_hours(str(tmp_path / "none")) == 0.0


def test_too_many_jobs_refused_before_any_work(tmp_path):
  from switchjax import cell_pool
  cores = len(cell_pool.usable_cores())
  with pytest.raises(ValueError, match=rf"--jobs {cores + 1}: expected 1 to "
                     rf"{cores}, the CPU cores"):
    sweep.run(micro_grid(), str(tmp_path / "w"), jobs=cores + 1)
  assert not os.path.exists(tmp_path / "w")
  assert cell_pool.core_shares(1) == [cell_pool.usable_cores()]


def test_core_shares_are_disjoint_and_cover_the_cores(monkeypatch):
  from switchjax import cell_pool
  monkeypatch.setattr(cell_pool, "usable_cores", lambda: [0, 1, 2, 3, 5])
  assert cell_pool.core_shares(2) == [[0, 1], [2, 3, 5]]
  assert cell_pool.core_shares(5) == [[0], [1], [2], [3], [5]]
  with pytest.raises(ValueError, match="--jobs 0: expected 1 to 5"):
    cell_pool.core_shares(0)


def test_sigterm_stops_every_worker_and_starts_no_other_cell(tmp_path):
  path = tmp_path / "micro_grid.py"
  path.write_text(MICRO_GRID)
  workdir = tmp_path / "w"
  # Four cells, two workers: the pool has handed the next cells out already.
  proc = subprocess.Popen(
      [sys.executable, "-m", "switchjax.sweep",
       f"--config={path}:cf1.0,cf2.0,cf4.0", f"--workdir={workdir}",
       "--jobs=2", "--config.overrides.train.num_steps=100000",
       "--config.overrides.train.eval_every=100000"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = [workdir / c / "metrics.jsonl" for c in ("cf1.0", "cf2.0")]
  try:
    deadline = time.time() + 240
    while not all(p.exists() and p.read_text().count("\n") >= 2
                  for p in metrics):
      assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, out
  assert "SIGTERM: the cells in training save their step and stop" in out
  for p in metrics:
    steps = [json.loads(l)["step"] for l in p.read_text().splitlines()]
    # Stopped early, and saved the step it stopped at: a rerun resumes there.
    assert 2 <= steps[-1] < 100000
    saved = os.listdir(p.parent / "checkpoints")
    assert str(steps[-1]) in saved, (steps[-1], saved)
    assert "stopped by SIGTERM" in (p.parent / "train.log").read_text()
    assert f"{p.parent.name}: stopped by SIGTERM after" in out
  for cell in ("cf4.0", "dense"):
    assert not (workdir / cell / "metrics.jsonl").exists(), cell
  lines = read_jsonl(str(workdir / "timing.jsonl"))
  assert [l["sweep"] for l in lines if "sweep" in l] == ["micro"]
  assert sorted(l["cell"] for l in lines if "cell" in l) == ["cf1.0", "cf2.0"]
