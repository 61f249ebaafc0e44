"""The reproduction protocol's step times, against this CPU's matmul peak.

Measures, in one run:
  peak      float32 matmul FLOP/s of a jitted [N, N] x [N, N] product (the
            best of N = 512, 1024, 2048): what this machine can do at best;
  variants  one training step (forward, backward, AdamW) of the protocol's
            cells (experiments/repro/protocol.py + findings.CELLS overrides) on a
            synthetic batch: dense, Switch at capacity factor 1.0 / 1.25 /
            2.0, top-2, Switch with its MoE layers or all else frozen
            (finding i's recipes); timed one step at a time, interleaved, `--repeats`
            rounds, median.

Prints per variant: step time, tokens/s, achieved GFLOP/s (matmul FLOPs of
the active path, 3x the forward; expert FLOPs at the capacity actually
computed, cf x tokens) and that as a fraction of the peak, and the step
time relative to dense.

  python -m benchmarks.repro_throughput [--repeats 10] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from switchjax import findings
from switchjax import grid
from switchjax import cost_model
from switchjax import train as train_lib
from switchjax import validate

VARIANTS = ("dense", "cf1.0", "cf1.25", "switch", "top2", "freeze_moe",
            "freeze_non_experts")
# Not cells of their own: finding (i)'s fine-tuning recipes, timed on the
# protocol's Switch (its cells add a task and a start that change no step).
FREEZE = {f"freeze_{r}": {"train.freeze": r} for r in ("moe", "non_experts")}


def matmul_peak(sizes=(512, 1024, 2048), repeats: int = 10) -> float:
  """Best float32 FLOP/s of a jitted square matmul."""
  best = 0.0
  for n in sizes:
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    for _ in range(3):
      t = time.perf_counter()
      for _ in range(repeats):
        y = f(x)
      y.block_until_ready()
      best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t))
  return best


def make_config(variant: str):
  c = grid.load_experiment(findings.EXPERIMENT, findings.PRESET)
  c = grid.apply_overrides(c, {**findings.CELLS, **FREEZE}[variant], variant)
  return validate.prepare(c)


def _batch(c) -> dict:
  rng = np.random.default_rng(0)
  b, l, v = c.train.batch_size, c.data.seq_length, c.model.vocab_size
  tokens = rng.integers(1, v, (b, l + 1), dtype=np.int32)
  return {"decoder_input_tokens": tokens[:, :-1],
          "decoder_target_tokens": tokens[:, 1:],
          "decoder_loss_weights": np.ones((b, l), np.float32)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  peak = matmul_peak()
  runners = {}
  for v in variants:
    c = make_config(v)
    trainer = train_lib.make_trainer(c)
    state = trainer.init_state()
    batch = train_lib._global_batch(trainer, _batch(c))  # pylint: disable=protected-access
    for _ in range(2):  # compile and warm up
      state, _ = trainer.train_step(state, batch)
    jax.block_until_ready(state)
    runners[v] = [c, trainer, state, batch]
  times = {v: [] for v in variants}
  for _ in range(args.repeats):
    for v, r in runners.items():
      t = time.perf_counter()
      r[2], metrics = r[1].train_step(r[2], r[3])
      jax.block_until_ready(metrics)
      times[v].append(time.perf_counter() - t)
  rows = []
  base = statistics.median(times[variants[0]])
  for v in variants:
    c = runners[v][0]
    sec = statistics.median(times[v])
    flops = cost_model.train_flops_per_step(c, slots=True) / sec
    rows.append({"variant": v, "step_ms": 1e3 * sec,
                 "tokens_per_sec": c.train.batch_size * c.data.seq_length / sec,
                 "gflops": flops / 1e9, "mfu": flops / peak,
                 "vs_first": sec / base})
  print(f"float32 matmul peak: {peak / 1e9:.0f} GFLOP/s "
        f"({jax.devices()[0].device_kind}, {args.repeats} rounds)")
  print(f"{'variant':18s} {'step ms':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s} "
        f"{'of peak':>8s} {'x ' + variants[0]:>9s}")
  for r in rows:
    print(f"{r['variant']:18s} {r['step_ms']:8.1f} {r['tokens_per_sec']:9.0f} "
          f"{r['gflops']:8.1f} {100 * r['mfu']:7.1f}% {r['vs_first']:9.2f}")
  out = {"peak_gflops": peak / 1e9, "repeats": args.repeats, "rows": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
