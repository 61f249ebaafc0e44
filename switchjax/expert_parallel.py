"""Expert parallelism: experts split over the mesh, tokens sent to them.

Notation: see `switchjax/__init__.py` (X: the size of the mesh axes that
'expert' maps to).

Both paths keep the routing where the tokens are: groups `[G, S, M]` are
split over the 'batch' mesh axes (partitioning.group_axes: only axes that
divide G, so a group never straddles devices), the router and
`switchjax.routing` run on each device's own groups, and the load-balancing
loss is computed from exactly the groups a single device would form. Only
the expert computation moves tokens:

- 'gspmd' (GShard, Lepikhin et al. 2020): sharding constraints on the expert
  buffers `[E, G, C, M]`: first G over the batch axes (as dispatched), then
  E over 'expert' and G over the remaining batch axes (as the experts need
  them). XLA turns the change of layout into an all-to-all, and back after
  the experts.
- 'shard_map': the same with explicit collectives under `jax.shard_map`:
  each device dispatches its groups into `[E, G_local, C, M]`,
  `lax.all_to_all` over the expert axes sends expert block j to device j
  (`[E / X, G_local * X, C, M]`), the local experts run, and a second
  all-to-all sends the outputs back for the local combine. With the expert
  hidden dim split over 'model', each device holds `[E/X, M, H/model]` and
  the partial outputs are summed over 'model' (Megatron-style).
  When G is too small to be split over the expert axes (a few decoder
  groups on many devices), the groups are replicated over those axes: each
  device runs its own experts on them and the partial combines are summed
  over the expert axes instead (same function, no all-to-all).

Gradients are those of the single-device function in both paths: expert
weight gradients are summed over the devices that hold copies of the
weights (JAX transposes the implicit broadcast over 'data' into a psum),
never averaged, so nothing is divided by the number of expert shards (the
correction t5x applies by hand for its per-device expert loss).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from switchjax import partitioning
from switchjax import routing as routing_lib

PATHS = ("gspmd", "shard_map")


def _axes(axes: tuple[str, ...]) -> Any:
  """Axis name argument of a collective: a name or a tuple of names."""
  return axes[0] if len(axes) == 1 else axes


def _layout(num_groups: int, num_experts: int, mesh: Any):
  """(group axes, expert axes, expert axes that also split G)."""
  g_axes = partitioning.group_axes(num_groups, mesh)
  e_axes = partitioning.axes_of("expert", mesh)
  if num_experts % partitioning.axes_size(e_axes, mesh):
    raise ValueError(
        f"num_experts={num_experts} is not divisible by the mesh's expert "
        f"axes {e_axes} of size {partitioning.axes_size(e_axes, mesh)}")
  shared = tuple(a for a in g_axes if a in e_axes)
  return g_axes, e_axes, shared


def constrain_groups(x: jax.Array) -> jax.Array:
  """Tokens in groups [G, S, M] (or [G, ...]): G over the batch axes."""
  mesh = partitioning.current_mesh()
  if mesh is None:
    return x
  return partitioning.constrain(
      x, partitioning.spec(partitioning.group_axes(x.shape[0], mesh)))


def to_experts(buffers: jax.Array) -> jax.Array:
  """GSPMD: dispatched buffers [E, G, C, M] from group- to expert-sharded."""
  mesh = partitioning.current_mesh()
  if mesh is None:
    return buffers
  g_axes, e_axes, _ = _layout(buffers.shape[1], buffers.shape[0], mesh)
  rest = tuple(a for a in g_axes if a not in e_axes)
  buffers = partitioning.constrain(buffers, partitioning.spec((), g_axes))
  return partitioning.constrain(buffers, partitioning.spec(e_axes, rest))


def from_experts(outputs: jax.Array) -> jax.Array:
  """GSPMD: expert outputs [E, G, C, M] from expert- back to group-sharded."""
  mesh = partitioning.current_mesh()
  if mesh is None:
    return outputs
  g_axes, e_axes, _ = _layout(outputs.shape[1], outputs.shape[0], mesh)
  rest = tuple(a for a in g_axes if a not in e_axes)
  outputs = partitioning.constrain(outputs, partitioning.spec(e_axes, rest))
  return partitioning.constrain(outputs, partitioning.spec((), g_axes))


def _strip(routing: routing_lib.Routing) -> routing_lib.Routing:
  """The routing's per-group index form (every leaf [G, ...]), no losses."""
  return routing.replace(aux_loss=None, metrics=None)


def per_group(fn):
  """fn(x[G, ...], routing) applied group by group (vmapped over G).

  Under GSPMD a gather indexed by an explicit group index is partitioned by
  replicating its operand (all-gathering every group's tokens); vmapped, the
  group axis becomes a batch dimension of the gather and stays split.
  `x_axis` / `out_axis`: where G sits in x and in fn's output.
  """
  def wrapped(x, routing, *, x_axis: int, out_axis: int):
    def one(xg, rg):
      xg = jnp.expand_dims(xg, x_axis)
      rg = jax.tree.map(lambda a: a[None], rg)
      return jnp.squeeze(fn(xg, rg), out_axis)
    return jax.vmap(one, in_axes=(x_axis, 0), out_axes=out_axis)(
        x, _strip(routing))
  return wrapped


def uses_shard_map(path: str) -> bool:
  """Whether `path` asks for shard_map and a mesh is there to map over."""
  if path not in PATHS:
    raise ValueError(f"Unknown expert_parallel {path!r}; expected one of {PATHS}.")
  return path == "shard_map" and partitioning.current_mesh() is not None


def shard_map_experts(groups: jax.Array, routing: routing_lib.Routing, *,
                      weights: dict[str, jax.Array],
                      expert_fn: Callable[..., jax.Array],
                      dispatch_fn: Callable[..., jax.Array],
                      combine_fn: Callable[..., jax.Array],
                      keep: Optional[jax.Array]) -> jax.Array:
  """Dispatch, experts and combine under jax.shard_map.

  Args:
    groups: [G, S, M] in the experts' dtype.
    routing: its Routing (only the index form goes in; losses stay out).
    weights: the stacked expert weights by name ('wi' or 'wi_0'/'wi_1', and
      'wo'), f32[E, M, H] and f32[E, H, M].
    expert_fn: (buffers [E', G', C, M], weights' local shards, keep's local
      shard) -> [E', G', C, M]; with H split, a partial sum over H shards.
    dispatch_fn, combine_fn: a `switchjax.dispatch` pair.
    keep: the expert-dropout mask bool[E, G, C, H] of the hidden
      activations, drawn outside for the global shape; None = no dropout.

  Returns [G, S, M], what the single-device path returns.
  """
  mesh = partitioning.current_mesh()
  num_groups, _, _ = groups.shape
  num_experts = weights["wo"].shape[0]
  g_axes, e_axes, shared = _layout(num_groups, num_experts, mesh)
  all_to_all = bool(shared)
  if shared and (shared != e_axes or g_axes[-len(e_axes):] != e_axes):
    raise ValueError(
        f"expert_parallel='shard_map' needs the batch rule's mesh axes to end "
        f"with all of the expert rule's axes {e_axes}, e.g. batch -> "
        f"'data,expert'; groups are split over {g_axes}")
  # The expert hidden dim may use mesh axes the tokens do not.
  h_axes = tuple(a for a in partitioning.axes_of("expert_mlp", mesh)
                 if a not in g_axes and a not in e_axes)
  d_ff = weights["wo"].shape[1]
  if d_ff % partitioning.axes_size(h_axes, mesh):
    h_axes = ()
  num_local = num_experts // partitioning.axes_size(e_axes, mesh)
  rest = tuple(a for a in g_axes if a not in e_axes)

  param_specs = {name: (partitioning.spec(e_axes, h_axes) if name == "wo"
                        else partitioning.spec(e_axes, (), h_axes))
                 for name in weights}
  # The mask lives where the hidden activations are: after the all-to-all
  # expert block j of group block `rest` (GShard's [E, G, C, H] layout).
  keep_spec = partitioning.spec(e_axes, rest if all_to_all else g_axes, (),
                                h_axes)
  # Aux loss and metrics stay outside; only the index form goes in.
  local_routing = _strip(routing)

  def ffn(buffers, params, keep):
    y = expert_fn(buffers, params, keep)
    return jax.lax.psum(y, _axes(h_axes)) if h_axes else y

  def local(x, r, params, keep):
    if all_to_all:
      buffers = dispatch_fn(x, r)  # [E, Gl, C, M]
      buffers = jax.lax.all_to_all(buffers, _axes(e_axes), 0, 1, tiled=True)
      y = ffn(buffers, params, keep)  # [E / X, Gl * X, C, M]
      y = jax.lax.all_to_all(y, _axes(e_axes), 1, 0, tiled=True)
      return combine_fn(y, r)
    # Groups replicated over the expert axes: local experts, summed combine.
    first = (jax.lax.axis_index(_axes(e_axes)) * num_local if e_axes else 0)
    mine = r.replace(
        token_index=jax.lax.dynamic_slice_in_dim(r.token_index, first,
                                                 num_local, axis=1),
        slot_weight=jax.lax.dynamic_slice_in_dim(r.slot_weight, first,
                                                 num_local, axis=1))
    y = ffn(dispatch_fn(x, mine), params, keep)  # [E / X, Gl, C, M]
    if not e_axes:
      return combine_fn(y, r)
    full = jnp.zeros((num_experts,) + y.shape[1:], y.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, y, first, axis=0)
    return jax.lax.psum(combine_fn(full, r), _axes(e_axes))

  group_spec = partitioning.spec(g_axes)
  mapped = jax.shard_map(
      local, mesh=mesh,
      in_specs=(group_spec, group_spec, param_specs,
                None if keep is None else keep_spec),
      out_specs=group_spec)
  return mapped(groups, local_routing, weights, keep)
