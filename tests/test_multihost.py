"""Two processes on localhost, 4 CPU devices each, train like one with 8.

Both processes run `python -m switchjax.main` with --coordinator_address,
--num_processes and --process_id (jax.distributed, gloo collectives). Each
reads its own half of the data; together they train on the mesh data=2 x
expert=4 that spans both. The reference is this (single) process on its 8
devices, fed the same two data shards side by side: the per-step losses must
match, process 0 alone must write the metrics, and the checkpoint the two
processes wrote together must restore here to the reference's parameters.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from switchjax import checkpoint as ckpt_lib
from switchjax import data as data_lib
from switchjax import distributed
from switchjax import train
from switchjax import validate

from conftest import experiment, no_cache, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# Switch-Base tiny shrunk to one sparse decoder-only layer (compile time).
OVERRIDES = {
    "model.arch": "decoder_only", "model.d_model": 32, "model.num_heads": 2,
    "model.head_dim": 16, "model.d_ff": 64, "model.num_decoder_layers": 1,
    "moe.sparse_every": 1, "moe.group_size": 32, "data.seq_length": 32,
    "train.batch_size": 8, "train.num_steps": STEPS, "train.log_every": 1,
    "train.eval_every": STEPS, "train.eval_steps": 1,
    "train.checkpoint_every": STEPS, "mesh.data": 2, "mesh.expert": 4,
    "moe.expert_parallel": "shard_map",
}


def _config():
  c = experiment("switch_base")
  for key, value in OVERRIDES.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _reference(config):
  """Per-step losses and final state of one process feeding both shards."""
  config = validate.prepare(config)
  trainer = train.make_trainer(config)
  state = trainer.init_state()
  half = config.train.batch_size // 2
  shards = [data_lib.make_iterator(config, "train", batch_size=half,
                                   process_index=i, process_count=2)
            for i in range(2)]
  losses = []
  for _ in range(STEPS):
    parts = [next(it) for it in shards]
    local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = trainer.train_step(state, train._global_batch(trainer, local))
    losses.append(float(metrics["loss"]))
  return trainer, state, losses


def test_two_processes_train_like_one(tmp_path):
  config = _config()
  # Builds the bundled dataset here first, so the workers only read it.
  trainer, want_state, want_losses = _reference(config)

  workdir = str(tmp_path / "run")
  address = f"localhost:{_free_port()}"
  env = dict(no_cache(os.environ), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(4))
  command = [sys.executable, "-m", "switchjax.main",
             "--config", os.path.join(ROOT, "experiments", "switch_base.py:tiny"),
             "--workdir", workdir, "--coordinator_address", address,
             "--num_processes", "2"]
  command += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  logs = [open(tmp_path / f"process_{i}.log", "w") for i in range(2)]
  procs = [subprocess.Popen(command + [f"--process_id={i}"], cwd=ROOT, env=env,
                            stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  outputs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
  assert "mesh {'data': 2, 'expert': 4, 'model': 1}" in outputs[0]
  assert "done:" not in outputs[1]  # process 1 prints nothing of its own

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "split" not in r]
  # One line per step: process 0 alone writes metrics.
  assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in train_rows], want_losses,
                             rtol=1e-5)

  # The checkpoint both processes wrote (state collectively, one data
  # iterator state each) restores here, on one process and its 8 devices.
  directory = ckpt_lib.checkpoint_dir(workdir)
  written = os.listdir(os.path.join(directory, str(STEPS), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(written)
  with ocp.CheckpointManager(directory, item_names=("state", "data")) as mgr:
    restored = mgr.restore(STEPS, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state)))["state"]
  assert int(restored["step"]) == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7),
      jax.device_get(want_state["params"]),
      jax.device_get(restored["params"]))


def test_initialize_flags_and_environment(monkeypatch):
  for var in list(os.environ):
    if var in distributed._CLUSTER_ENV or var.startswith(("SLURM_", "TPU_")):
      monkeypatch.delenv(var)
  assert distributed.detected_cluster() is None
  assert distributed.initialize() is False  # no flags, no cluster: one process
  assert distributed.initialize("localhost:1", 1, 0) is False
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize(num_processes=2)
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
    distributed.initialize("localhost:1", 2, 2)
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.detected_cluster() is None  # a one-task SLURM job
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.detected_cluster() == "SLURM"
  monkeypatch.delenv("SLURM_JOB_ID")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0")
  assert distributed.detected_cluster() is None  # a single-host TPU VM
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1")
  assert distributed.detected_cluster() == "Cloud TPU"
