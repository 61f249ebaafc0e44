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
