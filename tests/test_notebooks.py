"""The notebooks run top to bottom on small inputs (nbclient), outputs unsaved.

Each notebook reads its parameters from environment variables in its first
code cell; the kernel inherits them from this process.
"""
import json
import os

import nbformat
import pytest

from conftest import FAST_COMPILE

nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def execute(name, tmp_path):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  return nb


def outputs(nb, kind):
  """Every output of `kind` ('image/png' or 'stream' text) in order."""
  found = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if kind == "stream" and out.get("output_type") == "stream":
        found.append(out["text"])
      elif kind in out.get("data", {}):
        found.append(out["data"][kind])
  return found


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch):
  # The kernel imports switchjax from this checkout, installed or not.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  # One CPU device in the kernel, whatever conftest gave this process.
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)


@pytest.mark.parametrize("name", ["routing.ipynb", "ablations.ipynb",
                                  "inspect_checkpoint.ipynb"])
def test_saved_without_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None


def test_routing_notebook(tmp_path):
  nb = execute("routing.ipynb", tmp_path)
  assert len(outputs(nb, "image/png")) == 5
  table = "".join(outputs(nb, "stream"))
  for router in ("switch top-1", "gshard top-2", "expert choice", "hash",
                 "loss-free top-2"):
    assert router in table
  assert ("soft: every column of dispatch sums to 1.00, every row of combine "
          "to 1.00") in table
  # Expert choice is balanced by construction: aux loss 0, every expert full.
  ec = next(line for line in table.splitlines()
            if line.startswith("expert choice"))
  assert ec.split()[4] == "0.000"
  assert ec.split()[5:] == ["0.25"] * 4


def write_fake_sweep(directory):
  """A finished 3-cell sweep's result files, as results.write leaves them."""
  from switchjax import results
  rows = [
      {"cell": "cf1.0", "series": "", "x": 1.0, "status": "done", "steps": 20,
       "params_total": 3_000_000, "params_active": 1_000_000,
       "train_loss": 5.0, "eval_loss": 5.1, "dropped_pct": 9.0,
       "tokens_per_sec": 3000.0, "steps_to_threshold": 10,
       "time_to_threshold": 12.0, "max_grad_norm": 1.0, "seed": 0},
      {"cell": "cf2.0", "series": "", "x": 2.0, "status": "done", "steps": 20,
       "params_total": 3_000_000, "params_active": 1_000_000,
       "train_loss": 4.9, "eval_loss": 5.0, "dropped_pct": 1.0,
       "tokens_per_sec": 2500.0, "max_grad_norm": 1.0, "seed": 0},
      {"cell": "dense", "series": "dense", "x": "", "status": "done",
       "steps": 20, "params_total": 1_000_000, "params_active": 1_000_000,
       "train_loss": 5.3, "eval_loss": 5.4, "dropped_pct": 0.0,
       "tokens_per_sec": 3500.0, "max_grad_norm": 1.0, "seed": 0},
  ]
  curves = [{"cell": r["cell"], "split": "train", "step": s,
             "loss": 9.0 - s * 0.2} for r in rows for s in (10, 20)]
  loads = {"cf1.0": {"encoder/layer_1": [0.25] * 4},
           "cf2.0": {"encoder/layer_1": [0.4, 0.2, 0.2, 0.2]}, "dense": {}}
  results.write(directory, rows, curves, loads, title="fake", threshold=8.0)
  with open(os.path.join(directory, "grid.json"), "w") as f:
    json.dump({"name": "fake_grid", "x_axis": "moe.train_capacity_factor",
               "loss_threshold": 8.0}, f)


def test_ablations_notebook(tmp_path, monkeypatch):
  directory = tmp_path / "sweep"
  write_fake_sweep(str(directory))
  monkeypatch.setenv("SWITCHJAX_RESULTS_DIR", str(directory))
  nb = execute("ablations.ipynb", tmp_path)
  markdown = "".join(outputs(nb, "text/markdown"))
  assert "### fake_grid" in markdown and "| cf2.0 |" in markdown
  # Curves, versus-axis, speed-quality and expert-load figures.
  assert len(outputs(nb, "image/png")) == 4


def test_inspect_checkpoint_notebook(tmp_path, monkeypatch):
  monkeypatch.setenv("SWITCHJAX_NB_STEPS", "2")
  monkeypatch.setenv("SWITCHJAX_NB_SMALL", "1")
  monkeypatch.setenv("TFDS_DATA_DIR", os.environ["TFDS_DATA_DIR"])
  nb = execute("inspect_checkpoint.ipynb", tmp_path)
  text = "".join(outputs(nb, "stream"))
  assert "step 2; 8 experts" in text
  for layer in ("encoder/layer_1", "decoder/layer_1"):
    assert f"== {layer}: capacity" in text
  assert "expert  7" in text
  assert len(outputs(nb, "image/png")) == 1
