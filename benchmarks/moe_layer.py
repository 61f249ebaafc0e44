"""Time and memory of one MoE layer (forward+backward) against the dense FFN.

For each configuration (router, dtype, group size S, capacity factor, E) it
measures, in one run:

  * the MoE layer on each requested path (`--paths`: dispatch 'gather',
    'einsum' or 'dropless', optionally with an experts impl, e.g.
    'gather:batched'), as `jit(value_and_grad)` of sum(y * cotangent) + the
    router losses w.r.t. the params and the input;
  * the FLOP-matched dense `MlpBlock` (same H; K=1) the same way;
  * the floor for large E: dense time + the time of a jitted copy of all the
    experts' weights (reads every weight byte once and writes a gradient-sized
    output once), the least a layer that touches every expert can cost;
  * peak memory of each compiled step, from XLA's memory analysis
    (arguments + outputs + temporaries, less aliased bytes).

Every computation is compiled and warmed up first; then each repeat times
every computation once, interleaved, so that load from other processes hits
all of them alike; tables report medians. Params are float32 and shared by
all configurations of the same E (the experts cast them to the compute dtype).

Run from the repository root:

  python -m benchmarks.moe_layer                  # small preset, a few minutes on 2 cores
  python -m benchmarks.moe_layer --preset full --json /tmp/moe_layer.json
  python -m benchmarks.moe_layer --num_experts 8 --group_size 256,1024,4096 \
      --paths gather,gather:batched,einsum --repeats 7
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from switchjax import experts as experts_lib
from switchjax import dispatch as dispatch_lib
from switchjax import ffn
from switchjax import moe
from switchjax import routing

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Grids; flags given explicitly override the preset's value.
PRESETS = {
    "small": dict(num_experts=[8, 32, 128], group_size=[256, 1024, 4096],
                  capacity_factor=[1.0], dtype=["float32"],
                  paths=["gather", "einsum"], repeats=5),
    "full": dict(num_experts=[8, 32, 128, 512], group_size=[256, 1024, 4096],
                 capacity_factor=[1.0, 1.25, 2.0],
                 dtype=["float32", "bfloat16"], paths=["gather", "einsum"],
                 repeats=5),
}


def _csv(kind):
  return lambda s: [kind(v) for v in s.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small", choices=tuple(PRESETS),
                 help="grid to run; the flags below override parts of it")
  p.add_argument("--num_experts", type=_csv(int), help="E values, comma-separated")
  p.add_argument("--group_size", type=_csv(int), help="S values")
  p.add_argument("--capacity_factor", type=_csv(float))
  p.add_argument("--dtype", type=_csv(str), help="float32,bfloat16")
  p.add_argument("--paths", type=_csv(str),
                 help="dispatch[:expert_impl] per path, e.g. gather,einsum,"
                 "gather:batched,gather:loop,dropless")
  p.add_argument("--repeats", type=int, help="timed repeats per computation")
  p.add_argument("--router", type=_csv(str), default=["switch"],
                 help=f"any of {routing.ROUTERS}")
  p.add_argument("--num_selected", type=int, default=2, help="K for topk / noisy_topk")
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=2048)
  p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (B * L)")
  p.add_argument("--seq_len", type=int, default=512, help="L; B = tokens / L")
  p.add_argument("--activation", default="relu", choices=ffn.ACTIVATIONS)
  p.add_argument("--no_floor", action="store_true", help="skip the weight-copy floor")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for d in args.dtype:
    if d not in DTYPES:
      p.error(f"unknown --dtype {d!r}; expected one of {tuple(DTYPES)}")
  for r in args.router:
    if r not in routing.ROUTERS:
      p.error(f"unknown --router {r!r}; expected one of {routing.ROUTERS}")
  for path in args.paths:
    dispatch, _, impl = path.partition(":")
    if dispatch not in dispatch_lib.DISPATCHES or (impl and impl not in experts_lib.EXPERT_IMPLS):
      p.error(f"bad --paths entry {path!r}: dispatch one of {dispatch_lib.DISPATCHES}, "
              f"optional ':impl' one of {experts_lib.EXPERT_IMPLS}")
  if args.tokens % args.seq_len:
    p.error(f"--seq_len {args.seq_len} does not divide --tokens {args.tokens}")
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  return args


def peak_bytes(compiled) -> Optional[int]:
  """Arguments + outputs + temporaries - aliased, from XLA's memory analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def make_step(module: nnx.Module, x: jax.Array, params=None
              ) -> tuple[Callable[[], object], Optional[int]]:
  """Compiled value_and_grad of sum(y * cotangent) (+ MoE losses) w.r.t. params and x.

  `params` (an nnx.State of the module's Params) replaces the module's own,
  so that configurations of the same E share one set of weights. Returns
  (a call of the compiled step, its peak memory in bytes).
  """
  graphdef, own, rest = nnx.split(module, nnx.Param, ...)
  params = own if params is None else params
  cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)

  def loss(params, x):
    out = nnx.merge(graphdef, params, rest)(x)
    if isinstance(out, tuple):  # MoeLayer: (y, MoeOutput)
      y, aux = out
      extra = aux.aux_loss + aux.z_loss
    else:
      y, extra = out, 0.0
    return jnp.sum(y.astype(jnp.float32) * cotangent) + extra

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
      params, x).compile()
  return (lambda: compiled(params, x)), peak_bytes(compiled)


def make_copy(experts) -> tuple[Callable[[], object], int]:
  """A jitted copy of the expert weights: reads them once, writes as many bytes."""
  weights = jax.tree.leaves(experts)
  nbytes = sum(w.size * w.dtype.itemsize for w in weights)
  compiled = jax.jit(lambda ws: [jnp.negative(w) for w in ws]).lower(
      weights).compile()
  return (lambda: compiled(weights)), nbytes


@dataclasses.dataclass
class Row:
  """One configuration's medians: wall-clock ms and process CPU ms."""
  router: str
  dtype: str
  group_size: int
  capacity_factor: float
  num_experts: int
  capacity: int
  expert_bytes: int
  dense: dict[str, float]  # {'wall': ms, 'cpu': ms}
  copy: Optional[dict[str, float]]
  paths: dict[str, dict[str, float]]  # path -> {'wall': ms, 'cpu': ms}
  dense_peak_mb: Optional[float]
  peak_mb: dict[str, Optional[float]]  # path -> peak MB

  def floor(self, clock: str) -> Optional[float]:
    return None if self.copy is None else self.dense[clock] + self.copy[clock]

  def ratios(self) -> dict[str, Optional[float]]:
    out = {}
    for clock in CLOCKS:
      floor = self.floor(clock)
      for path, ms in self.paths.items():
        out[f"{path}/dense {clock}"] = ms[clock] / self.dense[clock]
        out[f"{path}/floor {clock}"] = ms[clock] / floor if floor else None
    return out


CLOCKS = ("wall", "cpu")


def _measure(fn: Callable[[], object]) -> dict[str, float]:
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return {"wall": (time.perf_counter() - wall) * 1e3,
          "cpu": (time.process_time() - cpu) * 1e3}


def _mb(nbytes: Optional[int]) -> Optional[float]:
  return None if nbytes is None else nbytes / 2**20


def _fmt(v, width: int, spec: str) -> str:
  if v is None:
    return f"{'-':>{width}}"
  return f"{v:>{width}}" if isinstance(v, str) else f"{format(v, spec):>{width}}"


def _print(title: str, cols: list[tuple[str, int, str]], lines: list[list]) -> None:
  print(title)
  header = " ".join(f"{name:>{w}}" for name, w, _ in cols)
  print(header)
  print("-" * len(header))
  for vals in lines:
    print(" ".join(_fmt(v, w, spec) for v, (_, w, spec) in zip(vals, cols)))
  print()


def print_tables(rows: list[Row], paths: list[str]) -> None:
  key_cols = [("router", 8, "s"), ("dtype", 9, "s"), ("S", 5, "d"),
              ("cf", 5, ".2f"), ("E", 4, "d"), ("C", 5, "d")]

  def keys(r):
    return [r.router, r.dtype, r.group_size, r.capacity_factor, r.num_experts,
            r.capacity]

  width = max(7, *(len(p) + 3 for p in paths))
  for clock, what in (("wall", "wall-clock"), ("cpu", "process CPU time")):
    cols = key_cols + [("dense", 7, ".0f"), ("floor", 7, ".0f")]
    cols += [(p, width, ".0f") for p in paths]
    cols += [(f"{p}/d", width, ".2f") for p in paths]
    cols += [(f"{p}/fl", width, ".2f") for p in paths]
    lines = []
    for r in rows:
      q = r.ratios()
      lines.append(
          keys(r) + [r.dense[clock], r.floor(clock)]
          + [r.paths[p][clock] if p in r.paths else None for p in paths]
          + [q.get(f"{p}/dense {clock}") for p in paths]
          + [q.get(f"{p}/floor {clock}") for p in paths])
    _print(f"{what}, ms per forward+backward (median); /d: vs dense, "
           "/fl: vs floor = dense + copy of the expert weights", cols, lines)
  cols = key_cols + [("dense", 7, ".0f")] + [(p, width, ".0f") for p in paths]
  lines = [keys(r) + [r.dense_peak_mb] + [r.peak_mb.get(p) for p in paths]
           for r in rows]
  _print("peak memory of the compiled step, MB (arguments + outputs + "
         "temporaries)", cols, lines)


def main(argv=None) -> list[Row]:
  args = parse_args(argv)
  shape = (args.tokens // args.seq_len, args.seq_len, args.d_model)
  x32 = jax.random.normal(jax.random.key(args.seed), shape)
  load_before = os.getloadavg()

  steps: dict[tuple, Callable[[], object]] = {}
  peaks: dict[tuple, Optional[int]] = {}
  expert_bytes: dict[int, int] = {}
  layout = []
  for e in args.num_experts:
    # One set of weights per E (and router kind: noisy_topk has a second
    # router kernel), shared by every configuration of that E.
    shared = {}
    for noisy in sorted({r == "noisy_topk" for r in args.router}):
      shared[noisy] = nnx.state(moe.MoeLayer(
          args.d_model, args.d_ff, num_experts=e,
          router="noisy_topk" if noisy else "switch",
          num_selected=min(args.num_selected, e), activation=args.activation,
          rngs=nnx.Rngs(args.seed)), nnx.Param)
    experts = next(iter(shared.values()))["experts"]
    expert_bytes[e] = sum(w.size * w.dtype.itemsize for w in jax.tree.leaves(experts))
    if not args.no_floor:
      steps[("copy", e)], _ = make_copy(experts)
    for dtype in args.dtype:
      x = x32.astype(DTYPES[dtype])
      if ("dense", dtype) not in steps:
        steps[("dense", dtype)], peaks[("dense", dtype)] = make_step(experts_lib.MlpBlock(
            args.d_model, args.d_ff, activation=args.activation,
            dtype=DTYPES[dtype], rngs=nnx.Rngs(args.seed)), x)
      for router in args.router:
        for s in args.group_size:
          for cf in args.capacity_factor:
            for path in args.paths:
              dispatch, _, impl = path.partition(":")
              if dispatch == "dropless" and router == "expert_choice":
                continue
              configured = moe.MoeLayer(
                  args.d_model, args.d_ff, num_experts=e, router=router,
                  num_selected=args.num_selected, train_capacity_factor=cf,
                  group_size=s, activation=args.activation, dispatch=dispatch,
                  expert_impl=impl or "auto", dtype=DTYPES[dtype],
                  rngs=nnx.Rngs(args.seed))
              key = (path, dtype, router, s, cf, e)
              steps[key], peaks[key] = make_step(
                  configured, x, shared[router == "noisy_topk"])
              del configured
            capacity = moe.MoeLayer(
                8, 8, num_experts=e, router=router,
                num_selected=min(args.num_selected, e),
                train_capacity_factor=cf, rngs=nnx.Rngs(0)).capacity(
                    min(s, args.tokens))
            layout.append((router, dtype, s, cf, e, capacity))

  print(f"devices: {jax.devices()}; d_model={args.d_model} d_ff={args.d_ff} "
        f"tokens={args.tokens} activation={args.activation}; "
        f"{len(steps)} computations, {args.repeats} interleaved repeats; "
        f"load average {load_before[0]:.1f}", flush=True)
  for fn in steps.values():  # warm-up, untimed
    jax.block_until_ready(fn())
  # Wall-clock is what a user waits; on a machine shared with other
  # processes it also counts the time our threads wait for a core, so the
  # process CPU time (all threads) is reported next to it.
  times = {key: [] for key in steps}
  for _ in range(args.repeats):
    for key, fn in steps.items():
      if key[0] == "copy":
        # Untimed first: absorbs the clean-up (freeing GBs) of the step before.
        jax.block_until_ready(fn())
      times[key].append(_measure(fn))
  med = {key: {c: statistics.median(t[c] for t in v) for c in CLOCKS}
         for key, v in times.items()}
  load_after = os.getloadavg()

  rows = []
  for router, dtype, s, cf, e, c in layout:
    paths = [p for p in args.paths if (p, dtype, router, s, cf, e) in med]
    rows.append(Row(
        router, dtype, s, cf, e, c, expert_bytes[e], med[("dense", dtype)],
        med.get(("copy", e)),
        {p: med[(p, dtype, router, s, cf, e)] for p in paths},
        _mb(peaks[("dense", dtype)]),
        {p: _mb(peaks[(p, dtype, router, s, cf, e)]) for p in paths}))
  print_tables(rows, args.paths)
  print(f"load average (1 min) before {load_before[0]:.1f}, after "
        f"{load_after[0]:.1f}; expert weights: "
        + ", ".join(f"E={e}: {b / 2**20:.0f} MB" for e, b in expert_bytes.items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "devices": [str(d) for d in jax.devices()],
                 "load_average": [load_before[0], load_after[0]],
                 "rows": [dict(dataclasses.asdict(r),
                               floor={c: r.floor(c) for c in CLOCKS},
                               ratios=r.ratios()) for r in rows]},
                f, indent=2)
    print(f"wrote {args.json}")
  return rows


if __name__ == "__main__":
  main()
