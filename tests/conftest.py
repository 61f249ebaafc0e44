"""Test setup: 8 fake CPU devices, so sharding tests run anywhere, and a
persistent compilation cache, so a program compiles once per worker.

Set before JAX is imported anywhere, so a plain `pytest` behaves like CI.
"""
import os
import tempfile

import pytest

# The suite's time is mostly XLA compiling small programs: LLVM's -O0 cuts
# that by about a quarter and changes no semantics (HLO passes still run).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS for this suite's processes and the subprocesses it starts."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


for _flag in xla_flags().split():
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Build the bundled tfds dataset in a throwaway directory, not ~/.
if "TFDS_DATA_DIR" not in os.environ:
  os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="switchjax_tfds_")
# The same small programs (a tiny config's train step, orbax's slicing)
# recur across tests and the command lines they start: JAX's persistent
# cache compiles each once (a repeated tiny-config test: 63 s -> 25 s).
# One folder per xdist worker: JAX writes entries without a lock, so two
# processes compiling the same program at once must not share a folder
# (tests that start concurrent processes drop the variable: `no_cache`).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="switchjax_xla_cache_")
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def no_cache(env: dict[str, str]) -> dict[str, str]:
  """`env` for processes that run at the same time: no shared JAX cache."""
  return {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str, preset="tiny"):
  """experiments/<name>.py's config for `preset`, as switchjax.main loads it.

  `name` is an experiment's name ('switch_base') or a path to its file.
  """
  from switchjax import grid  # after the XLA flags above: it imports JAX
  path = (name if name.endswith(".py")
          else os.path.join(ROOT, "experiments", f"{name}.py"))
  return grid.load_experiment(path, preset)


def script(name: str):
  """scripts/<name>.py as a module (the scripts are not a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      f"scripts_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def switch_run(tmp_path_factory):
  """A workdir of tiny Switch-Base, shrunk (test_train.short), trained 2
  steps: the pre-trained run that decoding, freezing, fine-tuning and
  distillation tests start from. Read it; copy it before changing it."""
  from switchjax import train  # after the XLA flags above: it imports JAX
  from test_train import load, short
  path = str(tmp_path_factory.mktemp("switch_run") / "run")
  train.train_and_evaluate(
      short(load(os.path.join(ROOT, "experiments", "switch_base.py")), 2), path)
  return path
