"""Runs that are stopped come back exactly: SIGTERM, SIGKILL, multi-process.

The end-to-end test drives the real command line in subprocesses (the point
is a process that dies), with a tiny decoder-only model; the subprocesses
share JAX's persistent compilation cache, so only the first one compiles.
"""
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import FAST_COMPILE, no_cache
from switchjax import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# experiments/switch_base.py:tiny shrunk: one sparse decoder layer (8 experts,
# switch routing with jitter, dropout 0.1: the rng has to replay too).
OVERRIDES = {
    "model.arch": "decoder_only", "moe.sparse_every": 1,
    "model.num_decoder_layers": 1, "model.d_model": 32,
    "model.num_heads": 2, "model.head_dim": 16, "model.d_ff": 64,
    "data.seq_length": 32, "train.batch_size": 8, "moe.group_size": 64,
    "train.log_every": 1, "train.eval_every": 1000, "train.eval_steps": 1,
}
STEPS = 12


def command(workdir, **overrides):
  """`python -m switchjax.main` for the tiny config, with overrides."""
  args = [sys.executable, "-m", "switchjax.main",
          "--config", "experiments/switch_base.py:tiny",
          "--workdir", str(workdir)]
  for key, value in {**OVERRIDES, **overrides}.items():
    args.append(f"--config.{key}={value}")
  return args


@pytest.fixture(scope="session")
def env(tmp_path_factory):
  """The environment of every subprocess: this one's (8 host devices, tfds
  dir) plus a compilation cache shared by all of them."""
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(args, env, timeout=600):
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def read_metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass  # the line being written right now
  return rows


def last_step(workdir):
  rows = [r["step"] for r in read_metrics(workdir) if "split" not in r]
  return max(rows, default=0)


def wait_until(condition, proc, timeout=300):
  end = time.monotonic() + timeout
  while not condition():
    assert proc.poll() is None, "the run ended before the test could stop it"
    assert time.monotonic() < end, "timed out waiting for the run"
    time.sleep(0.02)


def assert_same_metrics(got, want):
  """Every logged line equal, to the bit, except the wall-clock throughput."""
  assert [(r["step"], r.get("split")) for r in got] == [
      (r["step"], r.get("split")) for r in want]
  for g, w in zip(got, want):
    g, w = dict(g), dict(w)
    g.pop("tokens_per_sec", None)
    w.pop("tokens_per_sec", None)
    assert g == w, g["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """Metrics of the run that is never stopped."""
  workdir = tmp_path_factory.mktemp("reference")
  out = run(command(workdir, **{"train.num_steps": STEPS,
                                "train.checkpoint_every": 4}), env)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows if "split" not in r] == list(
      range(1, STEPS + 1))
  return rows


def test_one_run_per_workdir_default_workdir_and_the_first_finishes(
    tmp_path, env):
  """Without --workdir a run goes to runs/<experiment>-<preset>; a second
  run there is refused while the first lives; the first finishes intact
  and the same command resumes there."""
  args = command("unused", **{"train.num_steps": 100000,
                              "train.checkpoint_every": 100000})
  i = args.index("--workdir")
  del args[i:i + 2]
  args[args.index("experiments/switch_base.py:tiny")] = os.path.join(
      ROOT, "experiments", "switch_base.py:tiny")
  workdir = tmp_path / "runs" / "switch_base-tiny"
  first = subprocess.Popen(args, cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  try:
    wait_until(lambda: last_step(workdir) >= 2, first)
    config = (workdir / "config.json").read_bytes()
    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert first.poll() is None, "the first run ended too soon to test"
    seen = last_step(workdir)
  finally:
    first.send_signal(signal.SIGTERM)
    stdout, _ = first.communicate(timeout=300)
  assert stdout.splitlines()[0] == ("workdir: runs/switch_base-tiny (the "
                                    "default for this config; --workdir DIR "
                                    "to choose)")
  assert second.returncode == 1
  assert re.fullmatch(
      r"error: --workdir runs/switch_base-tiny is in use by pid "
      rf"{first.pid} on {re.escape(socket.gethostname())} \(since [0-9: -]+ "
      r"UTC\): one run per workdir \(wait for it, stop it, or use another "
      r"workdir\)", second.stderr.strip().splitlines()[-1]), second.stderr
  # The second touched nothing: the first kept logging every step, saved
  # where it stopped, and released the workdir.
  assert first.returncode == 0, stdout
  assert (workdir / "config.json").read_bytes() == config
  steps = [r["step"] for r in read_metrics(workdir) if "split" not in r]
  assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= seen
  assert (workdir / "checkpoints" / str(steps[-1])).is_dir()
  assert not (workdir / "run.lock").exists()
  assert os.listdir(tmp_path) == ["runs"]
  # The same command again (ending where it stopped) resumes there.
  again = subprocess.run(args + [f"--config.train.num_steps={steps[-1]}"],
                         cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from {workdir / 'checkpoints'} at step {steps[-1]}" in (
      again.stdout)


def test_sigterm_then_sigkill_resume_exactly(tmp_path, reference, env):
  workdir = tmp_path / "w"
  cmd = command(workdir, **{"train.num_steps": STEPS,
                            "train.checkpoint_every": 4})
  log = open(tmp_path / "log", "w")

  # 1. SIGTERM (preemption): the step in flight finishes and is saved.
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=log, text=True)
  wait_until(lambda: last_step(workdir) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, stdout
  stop = last_step(workdir)
  assert 2 <= stop < STEPS
  assert (f"stopped by SIGTERM after step {stop} of {STEPS}; saved checkpoint "
          f"{stop}") in stdout
  assert (workdir / "checkpoints" / str(stop)).is_dir()
  resume_line = [l for l in stdout.splitlines() if l.startswith("to resume: ")]
  assert len(resume_line) == 1
  printed = shlex.split(resume_line[0][len("to resume: "):])
  assert printed[1:] == cmd[1:]  # the same command

  # 2. The printed command resumes; SIGKILL it once a newer checkpoint exists.
  newer = (stop // 4 + 1) * 4
  proc = subprocess.Popen(printed, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=log, text=True)
  wait_until(lambda: (workdir / "checkpoints" / str(newer)).is_dir()
             and last_step(workdir) > newer, proc)
  proc.kill()
  stdout, _ = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert f"resumed from {workdir / 'checkpoints'} at step {stop}" in stdout
  assert last_step(workdir) < STEPS, "killed too late to test anything"
  assert (workdir / "run.lock").exists()  # the killed run's: taken over below

  # 3. The same command again finishes the run.
  out = run(cmd, env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert not (workdir / "run.lock").exists()
  resumed = [l for l in out.stdout.splitlines() if l.startswith("resumed from")]
  assert len(resumed) == 1 and int(resumed[0].split()[-1]) >= newer
  assert_same_metrics(read_metrics(workdir), reference)


def test_guard_stops_at_the_next_step_boundary():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    assert guard.mode == "local"
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop(2)
    assert guard.reason == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is previous


def test_second_ctrl_c_aborts_at_once():
  with preemption.PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.should_stop(1) and guard.reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs between bytecodes


def test_allreduce_mode_stops_one_step_late():
  with preemption.PreemptionGuard(mode="allreduce") as guard:
    assert not guard.should_stop(1)
    assert not guard.should_stop(2)
    os.kill(os.getpid(), signal.SIGTERM)
    assert not guard.should_stop(3)  # its flag is reduced now, read next step
    assert guard.should_stop(4)


WORKER = """
import os, signal, sys, time
pid, port, sig = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=pid)
from switchjax import preemption
with preemption.PreemptionGuard() as guard:
  for step in range(1, 2000):
    if pid == 1 and step == 5:
      os.kill(os.getpid(), getattr(signal, sig))
    time.sleep(0.01 * (pid + 1))  # the processes run at different speeds
    if guard.should_stop(step):
      print("stopped", guard.mode, step, guard.reason, flush=True)
      break
"""


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("service,sig,mode", [
    ("true", "SIGTERM", "jax"),  # JAX's preemption sync point
    ("true", "SIGINT", "jax"),  # re-sent as SIGTERM to JAX's notifier
    ("false", "SIGTERM", "allreduce"),
])
def test_processes_agree_on_the_stop_step(tmp_path, service, sig, mode):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = {**no_cache(os.environ), "JAX_ENABLE_PREEMPTION_SERVICE": service,
         "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port, sig],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  lines = [next(l for l in out.splitlines() if l.startswith("stopped "))
           .split(maxsplit=3)[1:] for out, _ in outs]
  assert [l[0] for l in lines] == [mode, mode]
  steps = {int(l[1]) for l in lines}
  assert len(steps) == 1 and steps.pop() > 5  # one step, after the signal
  notice = "a preemption notice (SIGTERM)"
  # JAX's own handler takes SIGTERM in 'jax' mode; this process then only
  # knows of a notice, like the process that got no signal.
  assert lines[1][2].strip() == (notice if (mode, sig) == ("jax", "SIGTERM")
                                 else sig)
  assert lines[0][2].strip() == notice
