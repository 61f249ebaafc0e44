"""What the checkpoint checksums cost, next to the save and restore they guard.

Saves a state of `--mib` MiB of float32 arrays with orbax (as
switchjax.checkpoint does, synchronously), then times, interleaved over
`--repeats` rounds (median):

  save      orbax StandardSave of the state, to disk
  record    checksums.record: SHA-256 of every file of the step (at save)
  restore   orbax StandardRestore of the state
  verify    checksums.mismatch: the same hashes, compared (at restore)

and prints each with its throughput and record / save, verify / restore.
The files are fresh in the page cache, so this is the hashing cost, not the
disk's; on a cold disk the restore reads the bytes once more to verify.

  python -m benchmarks.checkpoint_checksums [--mib 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from switchjax import checksums


def state_of(mib: int) -> dict[str, jax.Array]:
  """A params-like pytree: 8 arrays summing to `mib` MiB of float32."""
  rng = np.random.default_rng(0)
  per = mib * 2**20 // 4 // 8
  return {f"layer_{i}": jax.numpy.asarray(
      rng.standard_normal(per, dtype=np.float32)) for i in range(8)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mib", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  state = state_of(args.mib)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          state)
  root = tempfile.mkdtemp(prefix="ckpt_bench_")
  times = {k: [] for k in ("save", "record", "restore", "verify")}
  ckptr = ocp.StandardCheckpointer()
  try:
    for r in range(args.repeats):
      path = os.path.join(root, str(r))
      t = time.perf_counter()
      ckptr.save(path, state)
      ckptr.wait_until_finished()
      times["save"].append(time.perf_counter() - t)
      t = time.perf_counter()
      hashed = checksums.record(path)
      times["record"].append(time.perf_counter() - t)
      t = time.perf_counter()
      jax.block_until_ready(ckptr.restore(path, abstract))
      times["restore"].append(time.perf_counter() - t)
      t = time.perf_counter()
      assert checksums.mismatch(path) is None
      times["verify"].append(time.perf_counter() - t)
  finally:
    ckptr.close()
    shutil.rmtree(root, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"state {args.mib} MiB, {hashed / 2**20:.0f} MiB on disk, "
        f"median of {args.repeats}:")
  for k in ("save", "record", "restore", "verify"):
    print(f"  {k:8s} {med[k]:7.3f} s  {hashed / 2**20 / med[k]:7.0f} MiB/s")
  print(f"  record / save {med['record'] / med['save']:.2f}; "
        f"verify / restore {med['verify'] / med['restore']:.2f}")


if __name__ == "__main__":
  main()
