"""Forward+backward time of one MoE layer: fast vs einsum dispatch vs dense FFN.

Times `jax.jit(jax.grad(...))` of the layer for the fast (gather) path, the
GShard one-hot einsum path and the FLOP-matched dense `MlpBlock` (same H, K=1),
over a grid of expert counts, group sizes, dtypes, capacity factors and
routers. Each configuration is compiled and warmed up first; then every
repeat times each configuration once, interleaved (so machine load drifts hit
all of them alike), and the table reports medians.

Run from the repository root (or anywhere after `pip install -e .`):

  python -m benchmarks.moe_layer                       # defaults: ~1-2 min on 2 CPU cores
  python -m benchmarks.moe_layer --num_experts 8,32,128 --group_size 512,2048 \
      --dtype float32,bfloat16 --json /tmp/moe_layer.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp

from switchjax import moe

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _csv(kind):
  return lambda s: [kind(v) for v in s.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_experts", type=_csv(int), default=[8, 64], help="E values, comma-separated")
  p.add_argument("--group_size", type=_csv(int), default=[1024], help="S values")
  p.add_argument("--dtype", type=_csv(str), default=["float32"], help="float32,bfloat16")
  p.add_argument("--capacity_factor", type=_csv(float), default=[1.0])
  p.add_argument("--router", type=_csv(str), default=["switch"], help=f"any of {moe.ROUTERS}")
  p.add_argument("--num_selected", type=int, default=2, help="K for topk / noisy_topk")
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=2048)
  p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (B * L)")
  p.add_argument("--seq_len", type=int, default=512, help="L; B = tokens / L")
  p.add_argument("--activation", default="relu", choices=moe.ACTIVATIONS)
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  for d in args.dtype:
    if d not in DTYPES:
      p.error(f"unknown --dtype {d!r}; expected one of {tuple(DTYPES)}")
  for r in args.router:
    if r not in moe.ROUTERS:
      p.error(f"unknown --router {r!r}; expected one of {moe.ROUTERS}")
  if args.tokens % args.seq_len:
    p.error(f"--seq_len {args.seq_len} does not divide --tokens {args.tokens}")
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  return args


def make_step(module: nnx.Module, x: jax.Array) -> Callable[[], jax.Array]:
  """Jitted forward+backward of sum(y * cotangent) (+ MoE losses) w.r.t. params and x."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)

  def loss(params, x):
    out = nnx.merge(graphdef, params, rest)(x)
    if isinstance(out, tuple):  # MoeLayer: (y, MoeOutput)
      y, aux = out
      extra = aux.aux_loss + aux.z_loss
    else:
      y, extra = out, 0.0
    return jnp.sum(y.astype(jnp.float32) * cotangent) + extra

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return lambda: step(params, x)


@dataclasses.dataclass
class Row:
  router: str
  dtype: str
  group_size: int
  capacity_factor: float
  num_experts: int
  capacity: int
  dense_ms: float
  fast_ms: float
  einsum_ms: float

  @property
  def ratios(self) -> dict[str, float]:
    return {"fast/dense": self.fast_ms / self.dense_ms,
            "einsum/dense": self.einsum_ms / self.dense_ms,
            "einsum/fast": self.einsum_ms / self.fast_ms}


def _timed(fn: Callable[[], jax.Array]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return (time.perf_counter() - start) * 1e3


def main(argv=None) -> list[Row]:
  args = parse_args(argv)
  x32 = jax.random.normal(jax.random.key(args.seed),
                          (args.tokens // args.seq_len, args.seq_len, args.d_model))

  # One step per distinct computation; dense depends only on the dtype.
  steps: dict[tuple, Callable[[], jax.Array]] = {}
  layout = []
  for dtype in args.dtype:
    x = x32.astype(DTYPES[dtype])
    steps[("dense", dtype)] = make_step(moe.MlpBlock(
        args.d_model, args.d_ff, activation=args.activation, dtype=DTYPES[dtype],
        rngs=nnx.Rngs(args.seed)), x)
    for router in args.router:
      for s in args.group_size:
        for cf in args.capacity_factor:
          for e in args.num_experts:
            layers = {}
            for dispatch in ("fast", "einsum"):
              layers[dispatch] = moe.MoeLayer(
                  args.d_model, args.d_ff, num_experts=e, router=router,
                  num_selected=args.num_selected, train_capacity_factor=cf,
                  group_size=s, activation=args.activation, dispatch=dispatch,
                  dtype=DTYPES[dtype], rngs=nnx.Rngs(args.seed))
              steps[(dispatch, dtype, router, s, cf, e)] = make_step(layers[dispatch], x)
            capacity = layers["fast"].capacity(min(s, args.tokens))
            layout.append((router, dtype, s, cf, e, capacity))

  print(f"devices: {jax.devices()}; d_model={args.d_model} d_ff={args.d_ff} "
        f"tokens={args.tokens} activation={args.activation}; "
        f"{len(steps)} computations, {args.repeats} interleaved repeats", flush=True)
  for key, fn in steps.items():  # compile + warm-up, untimed
    for _ in range(1 + args.warmup):
      jax.block_until_ready(fn())
  times = {key: [] for key in steps}
  for _ in range(args.repeats):
    for key, fn in steps.items():
      times[key].append(_timed(fn))
  med = {key: statistics.median(v) for key, v in times.items()}

  rows = [Row(router, dtype, s, cf, e, c, med[("dense", dtype)],
              med[("fast", dtype, router, s, cf, e)],
              med[("einsum", dtype, router, s, cf, e)])
          for router, dtype, s, cf, e, c in layout]
  header = (f"{'router':<15}{'dtype':<10}{'S':>6}{'cf':>6}{'E':>5}{'C':>6}"
            f"{'dense ms':>10}{'fast ms':>10}{'einsum ms':>11}"
            f"{'fast/dense':>12}{'einsum/dense':>14}{'einsum/fast':>13}")
  print(header)
  print("-" * len(header))
  for r in rows:
    q = r.ratios
    print(f"{r.router:<15}{r.dtype:<10}{r.group_size:>6}{r.capacity_factor:>6.2f}"
          f"{r.num_experts:>5}{r.capacity:>6}{r.dense_ms:>10.1f}{r.fast_ms:>10.1f}"
          f"{r.einsum_ms:>11.1f}{q['fast/dense']:>12.2f}{q['einsum/dense']:>14.2f}"
          f"{q['einsum/fast']:>13.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "devices": [str(d) for d in jax.devices()],
                 "rows": [dict(dataclasses.asdict(r), **r.ratios) for r in rows]},
                f, indent=2)
    print(f"wrote {args.json}")
  return rows


if __name__ == "__main__":
  main()
