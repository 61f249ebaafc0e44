"""Where the MoE layer (gather dispatch)'s time goes, piece by piece, against the dense FFN.

Times forward+backward of each stage of `MoeLayer` (dispatch 'gather') on its
own, in one run, interleaved, medians of --repeats:

  route      router matmul + routing (Switch top-1 or as --router says)
  dispatch   gather of the tokens into expert buffers [E, G, C, M]
  experts    the E expert FFNs on those buffers (impl loop and batched)
  combine    the weighted gather back to tokens [G, S, M]
  layer      the whole layer, as benchmarks/moe_layer.py times it
  dense      the FLOP-matched dense FFN on all tokens
  dense@EGC  the dense FFN on E * G * C tokens: the experts' FLOPs at cf != 1

The experts run with impl 'loop' inside the layer on CPU ('auto').

  python -m benchmarks.moe_breakdown --num_experts 8 --group_size 1024
"""
from __future__ import annotations

import argparse
import statistics

from flax import nnx
import jax
import jax.numpy as jnp

from benchmarks import moe_layer as bench
from switchjax import dispatch as dispatch_lib
from switchjax import experts as experts_lib
from switchjax import moe
from switchjax import routing as routing_lib


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_experts", type=int, default=8)
  p.add_argument("--group_size", type=int, default=1024)
  p.add_argument("--capacity_factor", type=float, default=1.0)
  p.add_argument("--router", default="switch", choices=routing_lib.ROUTERS)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=2048)
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--dtype", default="float32", choices=tuple(bench.DTYPES))
  p.add_argument("--repeats", type=int, default=7)
  return p.parse_args(argv)


def _fwd_bwd(fn, *args):
  """Compiled grad of sum(fn(*args) * cotangent) w.r.t. every argument."""
  out = jax.eval_shape(fn, *args)
  cot = jax.random.normal(jax.random.key(1), out.shape, jnp.float32)
  grad = jax.jit(jax.grad(
      lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot),
      argnums=tuple(range(len(args))), allow_int=True))
  return lambda: grad(*args)


def main(argv=None) -> dict[str, dict[str, float]]:
  args = parse_args(argv)
  dtype = bench.DTYPES[args.dtype]
  x = jax.random.normal(jax.random.key(0), (args.tokens // args.seq_len,
                                            args.seq_len, args.d_model))
  layer = moe.MoeLayer(args.d_model, args.d_ff, num_experts=args.num_experts,
                       router=args.router, group_size=args.group_size,
                       train_capacity_factor=args.capacity_factor,
                       dtype=dtype, rngs=nnx.Rngs(0))
  groups = dispatch_lib.group_tokens(x, args.group_size)
  routing, _ = layer.route(groups)
  buffers = dispatch_lib.dispatch_gather(groups.astype(dtype), routing)
  e, g, c, m = buffers.shape
  params = nnx.state(layer.experts, nnx.Param)
  graphdef = nnx.graphdef(layer.experts)

  def experts(impl):
    def run(params, buffers):
      module = nnx.merge(graphdef, params)
      module.impl = impl
      return module(buffers, deterministic=True)
    return run

  l_def, l_params, l_rest = nnx.split(layer, nnx.Param, ...)
  r_def, r_params, r_rest = nnx.split(
      layer, nnx.All(nnx.Param, nnx.PathContains("router")), ...)

  def route(params, groups):
    r, logits = nnx.merge(r_def, params, r_rest).route(groups)
    return r.token_weight + logits.mean()  # depends on both outputs

  dense = experts_lib.MlpBlock(args.d_model, args.d_ff, dtype=dtype, rngs=nnx.Rngs(0))
  d_def, d_params = nnx.split(dense, nnx.Param)
  run_dense = lambda p, x: nnx.merge(d_def, p)(x)
  steps = {
      "route": _fwd_bwd(route, r_params, groups),
      "dispatch": _fwd_bwd(dispatch_lib.dispatch_gather, groups.astype(dtype), routing),
      "experts (loop)": _fwd_bwd(experts("loop"), params, buffers),
      "experts (batched)": _fwd_bwd(experts("batched"), params, buffers),
      "combine": _fwd_bwd(dispatch_lib.combine_indexed, buffers, routing),
      "layer": _fwd_bwd(lambda p, x: nnx.merge(l_def, p, l_rest)(x)[0],
                        l_params, x.astype(dtype)),
      "dense": _fwd_bwd(run_dense, d_params, x.astype(dtype)),
      "dense@EGC": _fwd_bwd(run_dense, d_params,
                            buffers.reshape(1, e * g * c, m)),
  }
  for fn in steps.values():  # compile and warm up
    jax.block_until_ready(fn())
  times = {k: [] for k in steps}
  for _ in range(args.repeats):
    for k, fn in steps.items():
      times[k].append(bench._measure(fn))  # pylint: disable=protected-access
  med = {k: {clock: statistics.median(t[clock] for t in v)
             for clock in bench.CLOCKS} for k, v in times.items()}
  print(f"E={e} S={args.group_size} G={g} C={c} cf={args.capacity_factor} "
        f"router={args.router} {args.dtype}; d_model={m} d_ff={args.d_ff} "
        f"tokens={args.tokens}; ms per forward+backward (median of "
        f"{args.repeats}), and as a fraction of the dense FFN")
  print(f"{'stage':>18} {'wall':>8} {'cpu':>8} {'wall/dense':>11}")
  # What the layer costs beyond its stages run alone: buffers the compiled
  # layer stacks or copies between them (see its HLO).
  med["stages summed"] = {
      clock: sum(med[k][clock] for k in ("route", "dispatch",
                                         "experts (loop)", "combine"))
      for clock in bench.CLOCKS}
  for k, v in med.items():
    print(f"{k:>18} {v['wall']:8.1f} {v['cpu']:8.1f} "
          f"{v['wall'] / med['dense']['wall']:11.2f}")
  return med


if __name__ == "__main__":
  main()
