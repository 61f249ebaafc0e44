"""All-to-all traffic and step time of the expert-parallel MoE layer.

For each mesh and each expert-parallel path ('gspmd', 'shard_map') it
compiles the MoE layer's training computation, jit(value_and_grad) of
sum(y * cotangent) + the router losses w.r.t. the params and the input, on
8 host CPU devices (set before JAX starts), and reports:

  * the bytes all-to-all moves per step, read from the compiled (per-device)
    HLO: for every all-to-all, each device sends (n - 1) / n of its operand
    bytes to the other n - 1 devices of its group; summed over ops and over
    all devices. Counted for the forward alone (compiled separately) and for
    forward + backward (the training step);
  * the minimum for the forward, 2 x tokens x d_model x bytes x (1 - 1/X)
    with X the number of expert shards: every token travels to its expert
    and back once, and a fraction 1/X of the tokens already sits on its
    expert's device (K = 1, perfect balance, no padding). The backward moves
    the same amount again (the cotangents travel the reverse way), so the
    forward + backward minimum is twice that. The ratio measured / minimum
    is the price of fixed capacity: empty slots travel too (about cf * K);
  * the median step time (forward + backward), interleaved repeats, next to
    the same layer on one device.

Run from the repository root:

  python -m benchmarks.all_to_all                       # a minute or two on 2 cores
  python -m benchmarks.all_to_all --mesh 2,4,1 --mesh 1,8,1 --json /tmp/a2a.json
"""
from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import dataclasses
import json
import math
import re
import statistics
import time
from typing import Any, Callable, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from switchjax import moe
from switchjax import routing
from switchjax import partitioning

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8,
          "s8": 1, "u8": 1, "pred": 1}
PATHS = ("gspmd", "shard_map")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mesh", action="append", default=None,
                 help="data,expert,model (repeatable); default 2,4,1 and 1,8,1")
  p.add_argument("--num_experts", type=int, default=8)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--d_ff", type=int, default=512)
  p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (B * L)")
  p.add_argument("--seq_len", type=int, default=256, help="L; B = tokens / L")
  p.add_argument("--group_size", type=int, default=512)
  p.add_argument("--capacity_factor", type=float, default=1.0)
  p.add_argument("--router", default="switch", choices=routing.ROUTERS)
  p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  args.mesh = [tuple(int(v) for v in m.split(",")) for m in
               (args.mesh or ["2,4,1", "1,8,1"])]
  for m in args.mesh:
    if len(m) != 3 or math.prod(m) != jax.device_count():
      p.error(f"--mesh {m}: three sizes whose product is the "
              f"{jax.device_count()} devices")
  if args.tokens % args.seq_len or args.tokens % args.group_size:
    p.error("--seq_len and --group_size must divide --tokens")
  return args


def _shape_bytes(text: str) -> int:
  """Bytes of the arrays in an HLO shape string such as '(f32[2,5,16], f32[2])'."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(line: str, operands: int) -> int:
  """Devices in one all-to-all group: tuple operands, else replica_groups."""
  if operands > 1:
    return operands
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if m:
    return int(m.group(2))
  raise ValueError(f"cannot read the group of: {line[:200]}")


def all_to_all_bytes(hlo: str, num_devices: int) -> tuple[int, int]:
  """(number of all-to-all ops, bytes sent between devices, all devices)."""
  ops, sent = 0, 0.0
  for line in hlo.splitlines():
    m = re.match(r"\s*%?[\w.\-]+ = (.*?) all-to-all\(", line)
    if not m:
      continue
    shape = m.group(1)
    operands = shape.count("[") if shape.startswith("(") else 1
    n = _group_size(line, operands)
    ops += 1
    sent += _shape_bytes(shape) * (n - 1) / n * num_devices
  return ops, int(sent)


def build(args, path: str, mesh) -> tuple[Callable, Callable, Any, Any]:
  """(loss, grad step, params, x) of the layer; mesh None = one device."""
  dtype = DTYPES[args.dtype]
  layer = moe.MoeLayer(
      args.d_model, args.d_ff, num_experts=args.num_experts, router=args.router,
      train_capacity_factor=args.capacity_factor, group_size=args.group_size,
      expert_parallel=path, dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (
      args.tokens // args.seq_len, args.seq_len, args.d_model)).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y.astype(jnp.float32) * cotangent) + aux.aux_loss + aux.z_loss

  grad = jax.value_and_grad(loss, argnums=(0, 1))
  if mesh is None:
    return jax.jit(loss), jax.jit(grad), params, x
  rules = partitioning.DEFAULT_RULES
  shardings = (partitioning.state_shardings(params, mesh, rules),
               partitioning.batch_sharding(mesh, rules))
  params = jax.device_put(params, shardings[0])
  x = jax.device_put(x, shardings[1])
  return (jax.jit(partitioning.in_mesh(loss, mesh, rules), in_shardings=shardings),
          jax.jit(partitioning.in_mesh(grad, mesh, rules), in_shardings=shardings),
          params, x)


@dataclasses.dataclass
class Row:
  path: str
  mesh: str
  expert_shards: int
  fwd_ops: int
  fwd_bytes: int
  step_ops: int
  step_bytes: int
  min_fwd_bytes: int
  ms: float

  @property
  def fwd_ratio(self) -> Optional[float]:
    return self.fwd_bytes / self.min_fwd_bytes if self.min_fwd_bytes else None

  @property
  def step_ratio(self) -> Optional[float]:
    return (self.step_bytes / (2 * self.min_fwd_bytes)
            if self.min_fwd_bytes else None)


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return (time.perf_counter() - start) * 1e3


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def print_table(rows: list[Row], args) -> None:
  mb = 2**20
  cols = [("path", 10, "s"), ("mesh d,e,m", 10, "s"), ("a2a fwd", 7, "d"),
          ("MB fwd", 8, ".2f"), ("min fwd", 8, ".2f"), ("ratio", 6, ".2f"),
          ("a2a f+b", 7, "d"), ("MB f+b", 8, ".2f"), ("min f+b", 8, ".2f"),
          ("ratio", 6, ".2f"), ("ms/step", 8, ".1f")]
  print(f"MoE layer: E={args.num_experts} M={args.d_model} H={args.d_ff} "
        f"tokens={args.tokens} S={args.group_size} cf={args.capacity_factor} "
        f"router={args.router} {args.dtype}; MB = all-to-all bytes sent between "
        "devices per step, all devices; min = 2 x tokens x M x bytes x "
        "(1 - 1/X) per forward, twice that for forward+backward")
  header = " ".join(f"{name:>{w}}" for name, w, _ in cols)
  print(header)
  print("-" * len(header))
  for r in rows:
    vals = [r.path, r.mesh, r.fwd_ops, r.fwd_bytes / mb, r.min_fwd_bytes / mb,
            r.fwd_ratio, r.step_ops, r.step_bytes / mb,
            2 * r.min_fwd_bytes / mb, r.step_ratio, r.ms]
    print(" ".join(f"{v:>{w}}" if isinstance(v, str) else f"{_fmt(v, s):>{w}}"
                   for v, (_, w, s) in zip(vals, cols)))


def main(argv=None) -> list[Row]:
  args = parse_args(argv)
  itemsize = jnp.dtype(DTYPES[args.dtype]).itemsize
  load_before = os.getloadavg()
  steps, rows = {}, []
  one = jax.devices()[:1]
  cases = [("1 device", None)] + [(p, m) for m in args.mesh for p in PATHS]
  for path, shape in cases:
    if shape is None:
      mesh = partitioning.make_mesh(ml_collections.ConfigDict(
          {"mesh": {"data": 1, "expert": 1, "model": 1},
           "moe": {"num_experts": args.num_experts}}), one)
    else:
      mesh = partitioning.make_mesh(ml_collections.ConfigDict(
          {"mesh": dict(zip(partitioning.MESH_AXES, shape)),
           "moe": {"num_experts": args.num_experts}}))
    loss, grad, params, x = build(args, "gspmd" if shape is None else path,
                                  None if shape is None else mesh)
    fwd_hlo = loss.lower(params, x).compile().as_text()
    compiled = grad.lower(params, x).compile()
    n = mesh.devices.size
    fwd_ops, fwd_bytes = all_to_all_bytes(fwd_hlo, n)
    step_ops, step_bytes = all_to_all_bytes(compiled.as_text(), n)
    shards = 1 if shape is None else partitioning.axes_size(
        partitioning.axes_of("expert", mesh), mesh)
    min_fwd = int(2 * args.tokens * args.d_model * itemsize * (1 - 1 / shards))
    steps[len(rows)] = (lambda c=compiled, p=params, x=x: c(p, x))
    rows.append(Row(path, "1,1,1" if shape is None else ",".join(map(str, shape)),
                    shards, fwd_ops, fwd_bytes, step_ops, step_bytes, min_fwd,
                    0.0))
  for fn in steps.values():  # warm-up
    jax.block_until_ready(fn())
  times = {k: [] for k in steps}
  for _ in range(args.repeats):
    for k, fn in steps.items():
      times[k].append(_timed(fn))
  for k, row in enumerate(rows):
    row.ms = statistics.median(times[k])
  load_after = os.getloadavg()
  print_table(rows, args)
  print(f"{jax.device_count()} host CPU devices; median of {args.repeats} "
        f"interleaved repeats; load average (1 min) before {load_before[0]:.1f}, "
        f"after {load_after[0]:.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": {k: v for k, v in vars(args).items()},
                 "load_average": [load_before[0], load_after[0]],
                 "rows": [dict(dataclasses.asdict(r), fwd_ratio=r.fwd_ratio,
                               step_ratio=r.step_ratio) for r in rows]},
                f, indent=2)
    print(f"wrote {args.json}")
  return rows


if __name__ == "__main__":
  main()
