"""Training-step throughput of a small encoder-decoder: dense vs MoE variants.

The model is T5.1.1-small shaped (d_model 512, 8 encoder + 8 decoder layers,
6 heads of 64, gated-GELU d_ff 1024; Switch's tiny preset resized), trained
by `switchjax.train.make_trainer`'s jitted step (forward, backward, Adafactor
update) on synthetic token batches. Variants:

  dense          the FLOP-matched baseline (no experts)
  switch8        Switch top-1, E=8, every other FFN sparse
  switch64       Switch top-1, E=64
  gshard8        GShard top-2, E=8 (twice the expert FLOPs of top-1)
  expert_choice  expert choice (E=8) in the encoder, Switch top-1 in the decoder
  switch8_freeze_moe, switch8_freeze_non_experts
                 switch8 fine-tuned with train.freeze=moe / non_experts (only
                 the rest, or only the experts, get gradients and updates)

Each step is compiled and warmed up, then the variants are timed one step
at a time, interleaved, for `--repeats` rounds; the table gives median step
times (wall and process CPU), tokens/s, the step-time ratio to dense, and
the floor for many experts: dense step + a copy of all expert weights (read
every weight, write a gradient's worth of bytes; timed on one MoE layer's
experts and multiplied by the number of MoE layers). MFU = model FLOPs / (step
time * --peak_flops) where the peak is given (e.g. 989e12 for an H100's dense
bf16); model FLOPs count the active matmuls only (3x the forward's).

  python -m benchmarks.train_step                    # ~15 min on 2 CPU cores
  python -m benchmarks.train_step --variants dense,switch8 --repeats 3
  python -m benchmarks.train_step --variants switch8,switch8_freeze_moe,switch8_freeze_non_experts
  python -m benchmarks.train_step --dtype bfloat16 --batch_size 64 --peak_flops 989e12
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from switchjax import cost_model
from switchjax import model as model_lib
from switchjax import train as train_lib

VARIANTS = ("dense", "switch8", "switch64", "gshard8", "expert_choice",
            "switch8_freeze_moe", "switch8_freeze_non_experts")


def _csv(kind):
  return lambda s: [kind(v) for v in s.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", type=_csv(str), default=list(VARIANTS[:5]),
                 help=f"comma-separated, from {VARIANTS}")
  p.add_argument("--batch_size", type=int, default=32, help="sequences per step")
  p.add_argument("--inputs_length", type=int, default=128)
  p.add_argument("--targets_length", type=int, default=32)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=1024)
  p.add_argument("--layers", type=int, default=8, help="layers per stack")
  p.add_argument("--num_heads", type=int, default=6)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--group_size", type=int, default=256)
  p.add_argument("--capacity_factor", type=float, default=1.0)
  p.add_argument("--dtype", default="float32", choices=tuple(model_lib.DTYPES))
  p.add_argument("--remat", default="none", choices=model_lib.REMATS)
  p.add_argument("--dispatch", default="gather", help="moe.dispatch")
  p.add_argument("--expert_impl", default="auto", help="moe.expert_impl")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--peak_flops", type=float, default=0.0,
                 help="hardware peak FLOP/s per device for MFU; 0 = unknown")
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  bad = [v for v in args.variants if v not in VARIANTS]
  if bad:
    p.error(f"unknown --variants {bad}; expected some of {VARIANTS}")
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  return args


def make_config(args: argparse.Namespace, variant: str) -> ml_collections.ConfigDict:
  """Switch-Base's tiny preset, resized to the benchmark's model and batch."""
  from experiments import switch_base  # pylint: disable=g-import-not-at-top
  c = switch_base.get_config("tiny")
  m, e, d, t = c.model, c.moe, c.data, c.train
  m.d_model, m.d_ff = args.d_model, args.d_ff
  m.num_heads, m.head_dim = args.num_heads, args.head_dim
  m.num_encoder_layers = m.num_decoder_layers = args.layers
  m.dtype, m.remat = args.dtype, args.remat
  m.dropout_rate = 0.0
  d.inputs_length, d.targets_length = args.inputs_length, args.targets_length
  t.batch_size = args.batch_size
  e.group_size = args.group_size
  e.train_capacity_factor = args.capacity_factor
  e.dispatch, e.expert_impl = args.dispatch, args.expert_impl
  e.router_jitter = 0.0
  e.num_experts = {"dense": 0, "switch64": 64}.get(variant, 8)
  e.router = "gshard" if variant == "gshard8" else "switch"
  if variant == "expert_choice":
    e.encoder_router = "expert_choice"
  t.freeze = variant.partition("_freeze_")[2]
  return c


def synthetic_batch(c: ml_collections.ConfigDict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b, li, lt = c.train.batch_size, c.data.inputs_length, c.data.targets_length
  v = c.model.vocab_size
  targets = rng.integers(1, v, (b, lt), dtype=np.int32)
  return {
      "encoder_input_tokens": rng.integers(1, v, (b, li), dtype=np.int32),
      "decoder_input_tokens": np.concatenate(
          [np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones((b, lt), np.float32),
  }


def expert_layers(state) -> list[list[jax.Array]]:
  """The stacked expert weights of each MoE layer in the train state."""
  layers: dict[str, list[jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
    name = jax.tree_util.keystr(path)
    if "experts" in name:
      layers.setdefault(name.split("experts")[0], []).append(leaf)
  return list(layers.values())


def _measure(fn: Callable[[], object]) -> dict[str, float]:
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return {"wall": (time.perf_counter() - wall) * 1e3,
          "cpu": (time.process_time() - cpu) * 1e3}


class _Runner:
  """One variant: its trainer, state (donated and replaced each step), batch."""

  def __init__(self, config):
    self.config = config
    self.trainer = train_lib.make_trainer(config)
    self.state = self.trainer.init_state()
    self.batch = train_lib._global_batch(  # pylint: disable=protected-access
        self.trainer, synthetic_batch(config))

  def __call__(self):
    self.state, metrics = self.trainer.train_step(self.state, self.batch)
    return self.state, metrics


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  load_before = os.getloadavg()
  configs = {v: make_config(args, v) for v in args.variants}
  runners: dict[str, Callable[[], object]] = {}
  copies: dict[str, tuple[Callable[[], object], int]] = {}
  for v, c in configs.items():
    runner = _Runner(c)
    runners[v] = runner
    layers = expert_layers(runner.state)
    if layers:
      # The floor's copy: one MoE layer's expert weights (own buffers: the
      # step donates the state's), timed and multiplied by the layer count;
      # copying all layers at once would hold another model's worth of memory.
      weights = [jnp.ones(w.shape, w.dtype) for w in layers[0]]
      copy = jax.jit(lambda ws: [jnp.negative(w) for w in ws])
      copies[v] = ((lambda copy=copy, ws=weights: copy(ws)), len(layers),
                   sum(w.size * w.dtype.itemsize for ws in layers for w in ws))
  fns = dict(runners)
  fns.update({f"copy:{v}": fn for v, (fn, _, _) in copies.items()})
  print(f"devices: {jax.devices()}; d_model={args.d_model} layers={args.layers}"
        f"+{args.layers} d_ff={args.d_ff} batch={args.batch_size}x"
        f"({args.inputs_length}+{args.targets_length}) dtype={args.dtype} "
        f"cf={args.capacity_factor} remat={args.remat}; load average "
        f"{load_before[0]:.1f}", flush=True)
  for fn in fns.values():  # compile + warm-up
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(args.repeats):
    for k, fn in fns.items():
      if k.startswith("copy:"):
        # Untimed first: absorbs the clean-up (freeing GBs) of the step before.
        jax.block_until_ready(fn())
      times[k].append(_measure(fn))
  med = {k: {c: statistics.median(t[c] for t in v) for c in ("wall", "cpu")}
         for k, v in times.items()}
  load_after = os.getloadavg()

  rows = []
  dense = med.get("dense")
  for v, c in configs.items():
    tokens = c.train.batch_size * (c.data.inputs_length + c.data.targets_length)
    flops = cost_model.train_flops_per_step(c)
    row = {"variant": v, "step_ms": med[v]["wall"], "cpu_ms": med[v]["cpu"],
           "tokens_per_sec": tokens / (med[v]["wall"] / 1e3),
           "model_tflops": flops / 1e12,
           "flops_vs_dense": (
               flops / cost_model.train_flops_per_step(configs["dense"])
               if "dense" in configs else None),
           "vs_dense": med[v]["wall"] / dense["wall"] if dense else None,
           "cpu_vs_dense": med[v]["cpu"] / dense["cpu"] if dense else None,
           "expert_mb": copies[v][2] / 2**20 if v in copies else None,
           "floor_ms": None, "vs_floor": None, "cpu_vs_floor": None,
           "mfu": (flops / (med[v]["wall"] / 1e3) / args.peak_flops
                   if args.peak_flops > 0 else None)}
    if v in copies and dense:
      count = copies[v][1]
      floor = {k: dense[k] + count * med[f"copy:{v}"][k] for k in ("wall", "cpu")}
      row.update(floor_ms=floor["wall"], vs_floor=med[v]["wall"] / floor["wall"],
                 cpu_vs_floor=med[v]["cpu"] / floor["cpu"])
    rows.append(row)

  cols = [("variant", 14, "s", "variant"), ("step ms", 9, ".0f", "step_ms"),
          ("cpu ms", 9, ".0f", "cpu_ms"), ("tokens/s", 10, ".0f", "tokens_per_sec"),
          ("FLOPs/dense", 12, ".2f", "flops_vs_dense"),
          ("step/dense", 11, ".2f", "vs_dense"),
          ("cpu/dense", 10, ".2f", "cpu_vs_dense"),
          ("experts MB", 11, ".0f", "expert_mb"), ("floor ms", 9, ".0f", "floor_ms"),
          ("step/floor", 11, ".2f", "vs_floor"),
          ("cpu/floor", 10, ".2f", "cpu_vs_floor"), ("MFU", 7, ".1%", "mfu")]
  header = " ".join(f"{name:>{w}}" for name, w, _, _ in cols)
  print(header)
  print("-" * len(header))
  for row in rows:
    print(" ".join(
        f"{'-':>{w}}" if row[key] is None else
        (f"{row[key]:>{w}}" if spec == "s" else f"{format(row[key], spec):>{w}}")
        for _, w, spec, key in cols))
  print(f"medians of {args.repeats} interleaved steps; floor = dense step + copy "
        f"of the variant's expert weights; load average (1 min) before "
        f"{load_before[0]:.1f}, after {load_after[0]:.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "devices": [str(d) for d in jax.devices()],
                 "load_average": [load_before[0], load_after[0]], "rows": rows},
                f, indent=2)
    print(f"wrote {args.json}")
  return rows


if __name__ == "__main__":
  main()
