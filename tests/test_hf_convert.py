"""Hugging Face checkpoints in and out: held against transformers itself.

Without torch: the checked-in checkpoints of tests/data/hf_reference/ (made
by scripts/make_hf_reference.py) are converted and scored, and must give
transformers' stored logits, experts and dropped tokens. With torch and
transformers (the `hf-test` extra): fresh random models, as a user would
save them, convert, score the same, and convert back bit for bit into a
directory transformers loads.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import numpy as safetensors_np

import hf_reference
from switchjax import hf_checkpoint
from switchjax import hf_convert
from switchjax import hf_layout
from switchjax import score as score_lib

CASES = sorted(hf_reference.CASES)
# float32 logits of two implementations that sum in different orders.
ATOL = 2e-5


needs_torch = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
    reason="torch and transformers not installed "
    "(pip install -e '.[hf-test]'); the checked-in references still ran")


def _score(workdir, batch, tmp_path, name="out.npz"):
  np.savez(tmp_path / f"{name}.in.npz", **batch)
  score_lib.score_file(str(workdir), str(tmp_path / f"{name}.in.npz"),
                       str(tmp_path / name))
  return dict(np.load(tmp_path / name))


def _assert_same_as_hf(ours, expected):
  np.testing.assert_allclose(ours["logits"], expected["logits"], atol=ATOL,
                             rtol=1e-5)
  hf_layers = sorted({k.rsplit("/", 1)[0] for k in expected if "/" in k})
  assert sorted(ours["moe_layers"]) == hf_layers
  for layer in hf_layers:
    np.testing.assert_array_equal(ours[f"{layer}/expert"][..., 0],
                                  expected[f"{layer}/expert"])
    np.testing.assert_array_equal(ours[f"{layer}/dropped"][..., 0],
                                  expected[f"{layer}/dropped"])


def _assert_same_tensors(src_dir, out_dir):
  a = safetensors_np.load_file(os.path.join(src_dir, "model.safetensors"))
  b = safetensors_np.load_file(os.path.join(out_dir, "model.safetensors"))
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("case", CASES)
def test_checked_in_reference_scores_as_transformers(case, tmp_path):
  """Convert, score as transformers did, convert back bit for bit."""
  src = os.path.join(hf_reference.REFERENCE_DIR, case)
  hf_convert.from_hf(src, str(tmp_path / "wd"))
  expected = dict(np.load(os.path.join(src, "expected.npz")))
  ours = _score(tmp_path / "wd", dict(np.load(os.path.join(src, "inputs.npz"))),
                tmp_path)
  _assert_same_as_hf(ours, expected)
  # The cases are what they say: drops where meant, none where not.
  dropped = [ours[k].any() for k in ours if k.endswith("/dropped")]
  if case in ("switch_tied_drops", "switch_step4", "switch_bf16"):
    assert any(dropped)
  elif case.startswith("switch"):
    assert dropped and not any(dropped)
  log_probs = np.take_along_axis(
      _log_softmax(expected["logits"]),
      np.load(os.path.join(src, "inputs.npz"))["decoder_target_tokens"][..., None],
      -1)[..., 0]
  np.testing.assert_allclose(ours["target_log_probs"], log_probs, atol=1e-4)
  hf_convert.to_hf(str(tmp_path / "wd"), str(tmp_path / "back"))
  _assert_same_tensors(src, tmp_path / "back")


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_config_mapping_of_the_layouts():
  """HF's sparse layers i % step == 1 and per-sequence fixed capacity."""
  def hf(num_layers, num_sparse):
    return {"architectures": [hf_layout.SWITCH], "vocab_size": 32,
            "d_model": 8, "num_heads": 2, "d_kv": 4, "d_ff": 16,
            "num_layers": num_layers, "num_decoder_layers": num_layers,
            "num_sparse_encoder_layers": num_sparse,
            "num_sparse_decoder_layers": num_sparse, "num_experts": 4,
            "expert_capacity": 5}
  from switchjax import model as model_lib  # pylint: disable=g-import-not-at-top
  for layers, sparse, want in ((12, 6, [1, 3, 5, 7, 9, 11]),
                               (12, 3, [1, 5, 9]), (4, 4, [0, 1, 2, 3]),
                               (4, 0, [1])):  # HF's "HACK": step = L
    c = hf_layout.config_from_hf(hf(layers, sparse))
    got = [i for i, s in enumerate(model_lib.sparse_layers(c.moe, layers)) if s]
    assert got == want, (layers, sparse)
    assert (c.moe.group_size, c.moe.expert_capacity) == (0, 5)
    back = hf_layout.hf_config(c)
    assert [i for i, s in enumerate(hf_layout.hf_sparse_layers(
        layers, back["num_sparse_encoder_layers"])) if s] == want


def _write_run(tmp_path, **overrides):
  """A workdir's config.json (to-hf refuses before it reads weights)."""
  from switchjax import validate  # pylint: disable=g-import-not-at-top
  src = os.path.join(hf_reference.REFERENCE_DIR, "switch_tied_drops")
  config = hf_layout.config_from_hf(
      json.load(open(os.path.join(src, "config.json"))))
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  (tmp_path / "run").mkdir()
  validate.write_config(config, str(tmp_path / "run"))
  return tmp_path / "run"


@pytest.mark.parametrize("key,value,named", [
    ("moe.group_size", 16, "moe.group_size"),
    ("moe.router", "topk", "moe.encoder_router / moe.router"),
    ("model.arch", "decoder_only", "model.arch"),
    ("model.activation", "gated_gelu", "model.activation"),
    ("moe.sparse_offset", 0, "moe.sparse_every / moe.sparse_offset"),
])
def test_to_hf_refuses_what_hf_cannot_express(tmp_path, key, value, named):
  run = _write_run(tmp_path, **{key: value})
  with pytest.raises(hf_layout.LayoutError, match=named):
    hf_convert.to_hf(str(run), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "switchjax.convert", *args],
                        capture_output=True, text=True, check=False)


def test_from_hf_refusals_are_one_line_and_write_nothing(tmp_path):
  src = os.path.join(hf_reference.REFERENCE_DIR, "t5_v1_relu")
  tensors = safetensors_np.load_file(os.path.join(src, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)

  def variant(name, config, tensors):
    path = tmp_path / name
    path.mkdir()
    with open(path / "config.json", "w") as f:
      json.dump(config, f)
    safetensors_np.save_file(tensors, str(path / "model.safetensors"))
    return str(path)

  missing = dict(tensors)
  del missing["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
  cases = {
      variant("unknown", {**config, "architectures": ["BertModel"]}, tensors):
          "BertModel",
      variant("missing", config, missing):
          "decoder.block.1.layer.2.DenseReluDense.wo.weight is missing",
      variant("shape", {**config, "d_ff": 48}, tensors): "has shape",
  }
  for path, named in cases.items():
    with pytest.raises(hf_convert.ERRORS, match=named):
      hf_convert.from_hf(path, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
  # The command line: one line, exit 1; an existing workdir is left alone.
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  result = _cli("from-hf", "--path", src, "--workdir", str(tmp_path / "taken"))
  assert result.returncode == 1
  assert result.stderr.strip().count("\n") == 0
  assert result.stderr.startswith("error: --workdir")
  assert os.listdir(tmp_path / "taken") == ["keep.txt"]


@needs_torch
@pytest.mark.parametrize("case", ["switch_bf16", "t5_v1_1_gated"])
def test_fresh_transformers_models_convert_score_and_round_trip(case, tmp_path):
  """New weights (not the checked-in ones), and transformers loads the way back.

  switch_bf16: untied head (so transformers 5 unties the stacks' input
  embeddings too), drops, bfloat16; t5_v1_1_gated: gated GELU, untied.
  """
  hf_dir = tmp_path / "hf"
  hf_reference.build(case, str(hf_dir), seed=100 + CASES.index(case))
  batch = hf_reference.inputs(seed=7)
  expected = hf_reference.hf_outputs(str(hf_dir), batch)
  hf_convert.from_hf(str(hf_dir), str(tmp_path / "wd"))
  _assert_same_as_hf(_score(tmp_path / "wd", batch, tmp_path), expected)
  hf_convert.to_hf(str(tmp_path / "wd"), str(tmp_path / "back"))
  _assert_same_tensors(hf_dir, tmp_path / "back")
  again = hf_reference.hf_outputs(str(tmp_path / "back"), batch)
  np.testing.assert_array_equal(again["logits"], expected["logits"])


@needs_torch
def test_checked_in_references_are_transformers_outputs():
  for case in CASES:
    src = os.path.join(hf_reference.REFERENCE_DIR, case)
    batch = dict(np.load(os.path.join(src, "inputs.npz")))
    now = hf_reference.hf_outputs(src, batch)
    stored = dict(np.load(os.path.join(src, "expected.npz")))
    assert sorted(now) == sorted(stored)
    for k in now:
      # torch's float32 sums run in an order that depends on its thread
      # count (a busy machine: up to 5e-6 apart on logits of ~10).
      np.testing.assert_allclose(now[k], stored[k], rtol=1e-5, atol=1e-5,
                                 err_msg=k)


def test_sharded_safetensors_read_back_as_one(tmp_path):
  from switchjax import hf_files  # pylint: disable=g-import-not-at-top
  src = os.path.join(hf_reference.REFERENCE_DIR, "switch_bf16")
  tensors = hf_files.read_tensors(src)
  written = hf_files.write_tensors(str(tmp_path), tensors,
                                   max_shard_bytes=20_000)
  assert hf_files.SAFETENSORS_INDEX in written and len(written) > 3
  back = hf_files.read_tensors(str(tmp_path))
  assert sorted(back) == sorted(tensors)
  assert all(back[n].dtype == tensors[n].dtype
             and back[n].tobytes() == tensors[n].tobytes() for n in tensors)


@needs_torch
def test_pytorch_bin_reads_as_safetensors(tmp_path):
  """A torch pickle, as checkpoints from before safetensors hold them."""
  import shutil  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  src = os.path.join(hf_reference.REFERENCE_DIR, "switch_tied_drops")
  (tmp_path / "bin").mkdir()
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "bin")
  tensors = safetensors_np.load_file(os.path.join(src, "model.safetensors"))
  torch.save({n: torch.from_numpy(a.copy()) for n, a in tensors.items()},
             tmp_path / "bin" / "pytorch_model.bin")
  _, from_bin, _ = hf_checkpoint.read_hf(str(tmp_path / "bin"))
  _, from_st, _ = hf_checkpoint.read_hf(src)
  assert sorted(from_bin) == sorted(from_st)
  for path in from_st:
    np.testing.assert_array_equal(from_bin[path], from_st[path])


@needs_torch
def test_fine_tuned_conversion_goes_back_to_transformers(tmp_path):
  """The issue's user story: a Switch checkpoint saved with transformers
  converts, scores as transformers, fine-tunes from its weights
  (experiments/finetune/from_workdir.py sets train.init_from), and converts
  back into a directory that transformers scores as switchjax does."""
  from conftest import experiment  # pylint: disable=g-import-not-at-top
  from switchjax import grid  # pylint: disable=g-import-not-at-top
  from switchjax import train  # pylint: disable=g-import-not-at-top
  hf_dir, wd, ft = tmp_path / "hf", tmp_path / "wd", tmp_path / "ft"
  # The bundled 2k vocabulary has 2176 ids: the model's rows must hold them.
  hf_reference.build("switch_tied_drops", str(hf_dir), seed=5, vocab_size=2176)
  batch = hf_reference.inputs(seed=3)
  hf_convert.from_hf(str(hf_dir), str(wd))
  before = _score(wd, batch, tmp_path, "before.npz")
  _assert_same_as_hf(before, hf_reference.hf_outputs(str(hf_dir), batch))

  config = grid.apply_overrides(
      experiment("experiments/finetune/from_workdir.py", str(wd)),
      {"data.vocab_path": "sentencepiece_2k.model", "data.inputs_length": 64,
       "data.targets_length": 16, "train.batch_size": 8, "train.num_steps": 3,
       "train.warmup_steps": 1, "train.learning_rate": 0.05,
       "train.eval_every": 3, "train.eval_steps": 1,
       "train.checkpoint_every": 3}, "test")
  assert config.train.init_from == str(wd)
  train.train_and_evaluate(config, str(ft))
  after = _score(ft, batch, tmp_path, "after.npz")
  assert np.abs(after["logits"] - before["logits"]).max() > 1e-3  # it trained
  hf_convert.to_hf(str(ft), str(tmp_path / "back"))
  _assert_same_as_hf(after, hf_reference.hf_outputs(str(tmp_path / "back"),
                                                    batch))
