"""Test setup: 8 fake CPU devices, so sharding tests run anywhere.

Set before JAX is imported anywhere, so a plain `pytest` behaves like CI.
"""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Build the bundled tfds dataset in a throwaway directory, not ~/.
if "TFDS_DATA_DIR" not in os.environ:
  import tempfile
  os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="switchjax_tfds_")

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
