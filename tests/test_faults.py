"""The fault table: bad input and bad days, each with its one-line message
and the proof that nothing already on disk was lost.

Refused configs and workdirs run in-process (they stop before compiling);
faults that need a running trainer (full disk, NaN) and the command-line
errors run `python -m switchjax.main` in subprocesses sharing JAX's
persistent compilation cache, with the tiny decoder-only model below.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from switchjax import checkpoint as ckpt_lib
from switchjax import data as data_lib
from switchjax import train
from switchjax import validate

from conftest import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/switch_base.py"

# Same model as tests/test_resume.py (so the compilation cache is shared).
OVERRIDES = {
    "model.arch": "decoder_only", "moe.sparse_every": 1,
    "model.num_decoder_layers": 1, "model.d_model": 32,
    "model.num_heads": 2, "model.head_dim": 16, "model.d_ff": 64,
    "data.seq_length": 32, "train.batch_size": 8, "moe.group_size": 64,
    "train.log_every": 1, "train.eval_every": 1000, "train.eval_steps": 1,
}
# The run every workdir case starts from: 4 steps, checkpoints 2 and 4.
BASE = {"train.num_steps": 4, "train.checkpoint_every": 2}


def command(workdir, **overrides):
  args = [sys.executable, "-m", "switchjax.main", "--config",
          f"{EXPERIMENT}:tiny", "--workdir", str(workdir)]
  return args + [f"--config.{k}={v}"
                 for k, v in {**OVERRIDES, **BASE, **overrides}.items()]


def config(**overrides):
  """The in-process twin of `command`'s config."""
  c = experiment(os.path.join(ROOT, EXPERIMENT))
  for key, value in {**OVERRIDES, **BASE, **overrides}.items():
    section, name = key.rsplit(".", 1)
    c[section][name] = value
  return c


@pytest.fixture(scope="session")
def env(tmp_path_factory):
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(args, env):
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def error_line(out) -> str:
  """The run's one `error:` line (orbax may log above it, never another)."""
  lines = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, out.stderr[-3000:]
  return lines[0]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_steps(workdir):
  return [r["step"] for r in read_metrics(workdir) if "split" not in r]


def snapshot(root):
  """relative path -> sha256 (files) or None (folders); None if no root."""
  if not os.path.lexists(root):
    return None
  if not os.path.isdir(root):
    with open(root, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  out = {}
  for dirpath, _, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    out[rel + "/"] = None
    for name in filenames:
      with open(os.path.join(dirpath, name), "rb") as f:
        out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp("base") / "w"
  out = run(command(workdir), env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


@pytest.fixture
def workdir(base_run, tmp_path):
  """A fresh copy of the base run's workdir."""
  copy = tmp_path / "w"
  shutil.copytree(base_run, copy)
  return copy


def biggest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"),
                                recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def truncate(path, size=100):
  with open(path, "r+b") as f:
    f.truncate(size)


# --- 1. Configs refused before any work: one line, no workdir created. ---

@pytest.mark.parametrize("overrides,message", [
    ({"train.num_stepz": 3}, r"unknown config keys: train\.num_stepz"),
    ({"moe.train_capacity_factor": 0.0},
     r"moe\.train_capacity_factor must be a finite number > 0, got 0\.0"),
    ({"moe.eval_capacity_factor": -1.0},
     r"moe\.eval_capacity_factor must be a finite number > 0, got -1\.0"),
    ({"moe.router": "topk", "moe.num_selected": 9},
     r"moe\.router='topk' sends each token to K=9 experts \(moe\.num_selected\)"
     r", more than moe\.num_experts=8"),
    ({"mesh.data": 2, "mesh.expert": 4, "moe.num_experts": 6},
     r"moe\.num_experts=6 is not divisible by the mesh's expert axis \(4\)"),
    ({"moe.group_size": 48},
     r"moe\.group_size=48 does not divide the decoder's 256 tokens"),
    ({"moe.router": "expert_choice"},
     r"moe\.router: router 'expert_choice' .* future tokens leak in a decoder"),
    ({"data.name": "c4/en:3.1.0", "data.data_dir": "/nonexistent/tfds"},
     r"data\.name: tfds dataset 'c4/en:3\.1\.0' is not prepared"),
    ({"data.vocab_path": "/nonexistent/spm.model"},
     r"data\.vocab_path: SentencePiece model not found"),
    ({"mesh.data": 3}, r"needs 3 devices, but 8 are available"),
    ({"train.batch_size": 4},
     r"train\.batch_size=4 is not divisible by the 8 batch shards"),
    ({"train.nan_policy": "ignore"},
     r"train\.nan_policy must be one of 'stop', 'skip', got 'ignore'"),
    ({"moe.router_dtype": "float16"},
     r"moe\.router_dtype must be one of 'float32', 'bfloat16'"),
], ids=["unknown-key", "zero-capacity-factor", "negative-capacity-factor",
        "num-selected-above-experts", "experts-vs-expert-axis",
        "group-size-vs-tokens", "expert-choice-in-decoder", "data-missing",
        "vocabulary-missing", "mesh-vs-devices", "batch-vs-shards",
        "bad-nan-policy", "bad-router-dtype"])
def test_bad_config_is_refused_before_any_work(overrides, message, tmp_path):
  workdir = tmp_path / "new" / "w"
  with pytest.raises(validate.ConfigError, match=message) as info:
    train.train_and_evaluate(config(**overrides), str(workdir))
  assert "\n" not in str(info.value)
  assert not (tmp_path / "new").exists()  # not even the parent was made


# --- 2. Workdirs refused: one line, every byte left as it was. ---

def _change(key, value):
  return lambda w: {key: value}


def _drop_config_json_and_shrink(w):
  os.remove(w / "config.json")
  return {"model.d_ff": 32}


def _garble_config_json(w):
  truncate(w / "config.json", 10)
  return {}


def _truncate_every_checkpoint(w):
  for step in ("2", "4"):
    truncate(biggest_file(w / "checkpoints" / step))
  return {}


@pytest.mark.parametrize("damage,error,message", [
    (_change("moe.num_experts", 4), validate.ConfigError,
     r"holds a run of another config \(differs in: moe\.num_experts\)"),
    (_change("train.learning_rate", 0.5), validate.ConfigError,
     r"holds a run with other train\.learning_rate; pass "
     r"--allow_config_change"),
    (_drop_config_json_and_shrink, validate.ConfigError,
     r"holds checkpoints of another model \(step 4: params/decoder/layers/0/"
     r"mlp/experts/wi_0/value is float32\[8, 32, 64\] there, "
     r"float32\[8, 32, 32\] here"),
    (_garble_config_json, validate.ConfigError,
     r"config\.json is unreadable .* refusing to reuse this workdir"),
    (_truncate_every_checkpoint, ckpt_lib.CheckpointError,
     r"no checkpoint in .* restores \(steps 4, 2; .*\); nothing was moved"),
], ids=["another-model-config", "safe-key-without-flag",
        "checkpoint-of-another-model", "garbled-config-json",
        "no-checkpoint-restores"])
def test_workdir_of_another_run_is_left_untouched(workdir, damage, error,
                                                  message):
  overrides = damage(workdir)
  before = snapshot(workdir)
  with pytest.raises(error, match=message) as info:
    train.train_and_evaluate(config(**overrides), str(workdir))
  assert "\n" not in str(info.value)
  assert snapshot(workdir) == before


def test_workdir_under_a_regular_file_is_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(validate.ConfigError,
                     match=r"a file is in the way \(.*file\); it must be a "
                     "directory"):
    train.train_and_evaluate(config(), str(blocker / "w"))
  assert blocker.read_text() == "not a folder"


def _mount(*args):
  return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
  """mount(size) -> a fresh tmpfs of that size (needs root, as in the dev
  container; the test is skipped elsewhere)."""
  mounted = []

  def mount(size):
    where = tmp_path / f"disk{len(mounted)}"
    where.mkdir()
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)):
      pytest.skip("cannot mount a tmpfs here (not root)")
    mounted.append(where)
    return where
  yield mount
  for where in mounted:
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_workdir_is_refused(base_run, tmpfs):
  disk = tmpfs("32m")
  workdir = disk / "w"
  shutil.copytree(base_run, workdir)
  assert _mount("-o", "remount,ro", str(disk))
  before = snapshot(workdir)
  with pytest.raises(validate.ConfigError,
                     match=rf"--workdir {workdir} is not writable"):
    train.train_and_evaluate(config(), str(workdir))
  assert snapshot(workdir) == before


def test_allowed_change_keeps_the_old_config(workdir):
  old = (workdir / "config.json").read_text()
  # num_steps 4 is where the run is: it only restores, compiles no step.
  summary = train.train_and_evaluate(config(**{"train.learning_rate": 0.02}),
                                     str(workdir), allow_config_change=True)
  assert summary["steps"] == 4
  history = list((workdir / "config_history").iterdir())
  assert [h.read_text() for h in history] == [old]
  assert json.loads((workdir / "config.json").read_text())["train"][
      "learning_rate"] == 0.02


# --- 3. Unreadable checkpoints: moved aside whole, the run goes on. ---

def _truncate_newest(w):
  truncate(biggest_file(w / "checkpoints" / "4"))
  return "4", 2


def _alter_newest_bytes(w):
  # Same size, one byte different: only the recorded checksums can tell.
  path = biggest_file(w / "checkpoints" / "4")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x01]))
  return "4", 2


def _delete_newest_metadata(w):
  os.remove(w / "checkpoints" / "4" / "state" / "_METADATA")
  return "4", 2


def _half_written_save(w):
  # What a save killed midway leaves: orbax's temporary folder.
  tmp = w / "checkpoints" / "6.orbax-checkpoint-tmp"
  shutil.copytree(w / "checkpoints" / "4", tmp)
  shutil.rmtree(tmp / "data")
  return "6.orbax-checkpoint-tmp", 4


@pytest.mark.parametrize("damage,report", [
    (_truncate_newest, r"checkpoint step 4 is unreadable \(.*\); moved to "),
    (_alter_newest_bytes, r"checkpoint step 4 is unreadable \(ChecksumMismatch"
     r": state/.* was altered after it was saved \(SHA-256 differs\)\); "
     r"moved to "),
    (_delete_newest_metadata,
     r"checkpoint step 4 is unreadable \(.*\); moved to "),
    (_half_written_save, r"checkpoint 6\.orbax-checkpoint-tmp is half-written "
     r"\(a save was interrupted\); moved to "),
], ids=["truncated-file", "altered-byte", "deleted-metadata",
        "half-written-save"])
def test_bad_checkpoint_is_moved_aside_and_the_run_resumes(
    workdir, damage, report, capsys):
  bad, good = damage(workdir)
  bad_files = snapshot(workdir / "checkpoints" / bad)
  good_files = snapshot(workdir / "checkpoints" / str(good))
  # num_steps = the good step: the run restores and compiles no step.
  summary = train.train_and_evaluate(
      config(**{"train.num_steps": good}), str(workdir))
  assert summary["steps"] == good
  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if "moved to" in l]
  assert len(lines) == 1
  assert re.match(report, lines[0]), lines[0]
  assert f"resumed from {workdir / 'checkpoints'} at step {good}" in out
  moved = lines[0].split("moved to ")[1].split(";")[0]
  assert os.path.dirname(moved) == str(workdir / "checkpoints_corrupt")
  assert snapshot(moved) == bad_files  # kept whole, byte for byte
  assert snapshot(workdir / "checkpoints" / str(good)) == good_files
  assert not (workdir / "checkpoints" / bad).exists()


# --- 4. Faults while training (subprocesses): one line, nothing lost. ---

# Runs switchjax.main with one fault planted (argv[1] names it).
FAULTY_MAIN = r"""
import errno, os, runpy, sys
import numpy as np
from switchjax import train, writers
fault = sys.argv.pop(1)
if fault == "nan":  # a NaN loss weight in the 3rd batch
  real_batch, calls = train._global_batch, [0]
  def batch(trainer, local):
    calls[0] += 1
    if calls[0] == 3:
      local = dict(local)
      w = local["decoder_loss_weights"].copy()
      w[0, 0] = np.nan
      local["decoder_loss_weights"] = w
    return real_batch(trainer, local)
  train._global_batch = batch
elif fault == "enospc":  # the disk fills while step 3's metrics are written
  real_write = writers.MetricsWriter.write
  def write(self, step, metrics, split=None):
    if step == 3:
      path = self._jsonl.name
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real_write(self, step, metrics, split)
  writers.MetricsWriter.write = write
sys.argv[0] = "switchjax.main"
runpy.run_module("switchjax.main", run_name="__main__", alter_sys=True)
"""


def faulty(fault, workdir, **overrides):
  return [sys.executable, "-c", FAULTY_MAIN, fault] + command(
      workdir, **overrides)[3:]


def test_nan_stops_naming_step_quantity_and_checkpoint(tmp_path, env):
  workdir = tmp_path / "w"
  out = run(faulty("nan", workdir), env)
  assert out.returncode == 1
  assert error_line(out) == (
      f"error: loss is nan at step 3; stopped without saving it; last good "
      f"checkpoint: step 2 in {workdir / 'checkpoints'}; to go on from there, "
      "rerun with --allow_config_change and a lower train.learning_rate, a "
      "train.grad_clip, or train.nan_policy=skip")
  assert train_steps(workdir) == [1, 2]  # nothing non-finite was logged
  assert os.listdir(workdir / "checkpoints") == ["2"]


def test_nan_step_is_skipped_and_counted(tmp_path, env):
  workdir = tmp_path / "w"
  out = run(faulty("nan", workdir, **{"train.nan_policy": "skip",
                                      "train.checkpoint_every": 1}), env)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [r for r in read_metrics(workdir) if "split" not in r]
  assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
  assert rows[2]["loss"] == "nan"  # logged as what it was
  assert all(np.isfinite(r["loss"]) for r in rows if r["step"] != 3)
  # The skipped update changed nothing but the step counters.
  c = validate.prepare(config(**{"train.nan_policy": "skip"}))
  trainer = train.make_trainer(c)
  ckpt = ckpt_lib.Checkpointer(str(workdir), max_to_keep=3, log=None)
  states = {}
  for step in (2, 3, 4):
    it = data_lib.make_iterator(c, "train", batch_size=8)
    states[step] = jax.device_get(
        ckpt.restore(step, trainer.abstract_state, it))
  ckpt.close()
  for key in ("params", "opt_state"):
    for a, b in zip(jax.tree.leaves(states[2][key]),
                    jax.tree.leaves(states[3][key])):
      np.testing.assert_array_equal(a, b)
  assert (int(states[3]["step"]), int(states[3]["skipped_steps"])) == (3, 1)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(states[3]["params"]),
      jax.tree.leaves(states[4]["params"])))


def test_full_disk_while_logging(tmp_path, env):
  workdir = tmp_path / "w"
  out = run(faulty("enospc", workdir), env)
  assert out.returncode == 1
  assert error_line(out) == (
      f"error: No space left on device: {workdir / 'metrics.jsonl'} at step "
      f"3; last good checkpoint: step 2 in {workdir / 'checkpoints'}; nothing "
      "already saved was lost: fix the cause (free space, permissions) and "
      "run the same command again to resume")
  assert train_steps(workdir) == [1, 2]
  assert os.listdir(workdir / "checkpoints") == ["2"]


def test_full_disk_while_saving_then_resume(tmpfs, env):
  disk = tmpfs("5m")
  workdir = disk / "w"
  cmd = command(workdir, **{"train.num_steps": 6})
  out = run(cmd, env)  # a checkpoint is 3.4 MB: the second one does not fit
  assert out.returncode == 1
  line = error_line(out)
  assert line.startswith("error: saving checkpoint step 4 failed (")
  assert "No space left on device" in line
  assert "Traceback" not in out.stderr  # the writer threads' echoes are quiet
  assert (f"; last good checkpoint: step 2 in {workdir / 'checkpoints'}; the "
          "partial save is moved aside on the next start") in line
  assert train_steps(workdir) == [1, 2, 3, 4]
  kept = snapshot(workdir / "checkpoints" / "2")
  assert _mount("-o", "remount,size=64m", str(disk))  # space freed
  out = run(cmd, env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "checkpoint 4.orbax-checkpoint-tmp is half-written" in out.stdout
  assert f"resumed from {workdir / 'checkpoints'} at step 2" in out.stdout
  assert train_steps(workdir) == [1, 2, 3, 4, 5, 6]
  assert snapshot(workdir / "checkpoints" / "2") == kept


# --- 5. The command line: one `error:` line, exit 1, no workdir. ---

@pytest.mark.parametrize("change,message", [
    (lambda a: a[:4] + ["experiments/nope.py"] + a[5:],
     "error: --config experiments/nope.py: [Errno 2] No such file or "
     "directory: 'experiments/nope.py'"),
    (lambda a: a[:4] + [f"{EXPERIMENT}:huge"] + a[5:],
     f"error: flag --config={EXPERIMENT}:huge: ValueError: Unknown preset "
     "'huge'; expected one of ('full', 'tiny')."),
    (lambda a: a + ["--config.train.num_stepz=3"],
     "error: --config.train.num_stepz: unknown config key 'num_stepz'. Did "
     "you mean \"num_steps\" instead of \"num_stepz\"?"),
    (lambda a: a + ["--config.train.num_steps=many"],
     "error: flag --config.train.num_steps=many: invalid literal for int() "
     "with base 10: 'many'"),
    (lambda a: a + ["--config.mesh.data=3"],
     "error: config.mesh {'data': 3, 'expert': 1, 'model': 1} needs 3 "
     "devices, but 8 are available"),
], ids=["bad-config-path", "bad-preset", "unknown-override", "bad-value",
        "mesh-not-matching-devices"])
def test_command_line_errors_are_one_line(tmp_path, env, change, message):
  workdir = tmp_path / "w"
  out = run(change(command(workdir)), env)
  assert out.returncode == 1
  assert error_line(out) == message
  assert not workdir.exists()


# --- 6. Selective precision: the router computes in float32. ---

def test_router_logits_stay_float32_in_a_bfloat16_model():
  from flax import nnx
  from switchjax import model as model_lib
  from switchjax import moe
  c = validate.prepare(config(**{"model.dtype": "bfloat16"}))
  x = jax.ShapeDtypeStruct((2, 4, c.model.d_model), jax.numpy.bfloat16)

  def logits(x):  # traced only: builds and routes without running anything
    model = model_lib.build_model(c, rngs=nnx.Rngs(0))
    routers = [m for _, m in nnx.iter_graph(model)
               if isinstance(m, moe.Router)]
    return [r(x, deterministic=True)[0] for r in routers]

  out = jax.eval_shape(logits, x)
  assert len(out) == 1  # the one sparse layer
  assert out[0].dtype == jax.numpy.float32
  assert out[0].shape == (2, 4, c.moe.num_experts)
