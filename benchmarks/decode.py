r"""Decode speed: the key/value cache against recomputing the prefix.

  python -m benchmarks.decode [--rows 1,8] [--prompt 32] [--new 64] [--repeats 3]

Both paths of `switchjax.decoding.generate` on the same model and prompts
(the reproduction protocol's decoder-only Switch model, and the tiny
Switch-Base encoder-decoder), interleaved, compiled before timing; greedy,
dropless MoE, no eos (id -1), so every row decodes `--new`
tokens. Prints new tokens per second and the cached / uncached ratio.
"""
import argparse
import os
import statistics
import time

import numpy as np
from flax import nnx

from switchjax import decoding
from switchjax import grid
from switchjax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"protocol (decoder-only)": ("repro/protocol.py", "switch"),
          "switch_base tiny (enc-dec)": ("switch_base.py", "tiny")}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="1,8")
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  print(f"{'model':28} {'rows':>4} {'cached tok/s':>12} {'uncached tok/s':>14} "
        f"{'ratio':>6}")
  for label, (path, preset) in MODELS.items():
    config = grid.load_experiment(os.path.join(ROOT, "experiments", path),
                                  preset)
    model = model_lib.build_model(config, rngs=nnx.Rngs(0))
    eos = -1  # no id: every row decodes --new tokens
    for rows in (int(r) for r in a.rows.split(",")):
      prompts = np.random.default_rng(0).integers(
          3, 1000, size=(rows, a.prompt)).tolist()
      times = {True: [], False: []}
      for _ in range(a.repeats + 1):  # the first round compiles
        for cache in (True, False):
          start = time.perf_counter()
          out = decoding.generate(model, prompts, eos_id=eos,
                                  max_new_tokens=a.new, dropless=True,
                                  cache=cache)
          times[cache].append(time.perf_counter() - start)
      new = sum(len(t) for t in out.tokens)
      rate = {c: new / statistics.median(t[1:]) for c, t in times.items()}
      print(f"{label:28} {rows:>4} {rate[True]:>12.0f} {rate[False]:>14.0f} "
            f"{rate[True] / rate[False]:>6.1f}")


if __name__ == "__main__":
  main()
