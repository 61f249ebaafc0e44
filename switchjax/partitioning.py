"""Device mesh ('data', 'expert', 'model'), logical axis rules, shardings.

Every parameter carries logical axis names (nnx metadata `out_sharding`,
e.g. `('expert', 'embed', 'expert_mlp')`); `config.partitioning.rules` maps
each logical name to mesh axes, so data, expert and model (tensor)
parallelism are config changes:

  batch      -> ('data', 'expert')   tokens, as t5x's MoE partitioner
  expert     -> 'expert'             the stacked expert weights' leading axis
  mlp, heads, expert_mlp, vocab -> 'model'
  embed, kv, length, relpos_buckets, unmodeled -> replicated

A dimension that its mesh axes do not divide keeps only the axes that do
(greedily, in order), and a mesh axis is used at most once per array, first
come first served (as flax's `logical_to_mesh_axes`). The optimizer state
follows its parameter: Adafactor's per-expert statistics (`count f32[E]`,
`v_row f32[E, ...]`, `v_col f32[E, ...]`) are split over 'expert' on their
leading axis like the expert weights.

The MoE layer reads the mesh and the rules of the current trace from context:
`jax.sharding.get_abstract_mesh()` and `current_rules()` (flax's logical axis
rules, `nnx.logical_axis_rules`), both set by `in_mesh` (the trainer wraps its
steps with it).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

from switchjax import config_base
from switchjax import freeze as freeze_lib
from switchjax import optim

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")
# logical name -> tuple of mesh axes (empty = replicated).
Rules = dict[str, tuple[str, ...]]


def _parse_axes(name: str, value: Any) -> tuple[str, ...]:
  """'data,expert' / ('data', 'expert') / 'model' / '' / None -> tuple of axes."""
  if value is None:
    return ()
  if isinstance(value, str):
    axes = tuple(a.strip() for a in value.split(",") if a.strip())
  else:
    axes = tuple(value)
  if any(a.lower() == "none" for a in axes):
    axes = tuple(a for a in axes if a.lower() != "none")
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown:
    raise ValueError(
        f"partitioning.rules.{name}: unknown mesh axes {unknown}; expected "
        f"some of {MESH_AXES} (comma-separated) or '' for replicated")
  if len(set(axes)) != len(axes):
    raise ValueError(f"partitioning.rules.{name}: repeated mesh axis in {axes}")
  return axes


def parse_rules(rules: Any) -> Rules:
  """A ConfigDict / dict / list of (name, axes) pairs -> Rules."""
  if isinstance(rules, (ml_collections.ConfigDict, dict)):
    items = rules.items()
  else:
    items = list(rules)
  return {str(name): _parse_axes(name, axes) for name, axes in items}


DEFAULT_RULES: Rules = parse_rules(config_base.base_config().partitioning.rules)


def rules_from_config(config: ml_collections.ConfigDict) -> Rules:
  """config.partitioning.rules (defaults for configs that lack it)."""
  part = config.get("partitioning")
  if part is None or part.get("rules") is None:
    return dict(DEFAULT_RULES)
  return {**DEFAULT_RULES, **parse_rules(part.rules)}


# ---------------------------------------------------------------------------
# Mesh.


def mesh_shape(config: ml_collections.ConfigDict,
               num_devices: int) -> tuple[int, int, int]:
  """Resolves config.mesh (one -1 entry takes the rest) against the devices."""
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide the "
          f"{num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
        f"devices, but {num_devices} are available")
  return tuple(sizes)


def check_mesh(config: ml_collections.ConfigDict, num_devices: int
               ) -> tuple[int, int, int]:
  """mesh_shape, and the expert axis must divide moe.num_experts."""
  shape = mesh_shape(config, num_devices)
  experts = config.moe.num_experts
  if experts and experts % shape[1]:
    raise ValueError(
        f"moe.num_experts={experts} is not divisible by the mesh's expert "
        f"axis ({shape[1]})")
  return shape


def make_mesh(config: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """The ('data', 'expert', 'model') mesh over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = check_mesh(config, len(devices))
  # Auto axes: GSPMD decides the layouts between the constraints we set.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


# ---------------------------------------------------------------------------
# Logical names -> PartitionSpec.


def logical_to_spec(names: Sequence[Optional[str]],
                    shape: Optional[Sequence[int]], mesh: Any,
                    rules: Optional[Rules] = None) -> P:
  """PartitionSpec of an array with logical axis `names` (None = replicated).

  With `shape`, a dimension keeps only the mesh axes whose sizes divide it.
  A mesh axis already used by an earlier dimension is skipped.
  """
  rules = DEFAULT_RULES if rules is None else rules
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"logical names {tuple(names)} do not match shape "
                     f"{tuple(shape)}")
  used: set[str] = set()
  dims = []
  for i, name in enumerate(names):
    if name is None:
      dims.append(None)
      continue
    if name not in rules:
      raise ValueError(
          f"no partitioning rule for logical axis {name!r}; add "
          f"partitioning.rules.{name} (known: {sorted(rules)})")
    axes, size = [], 1
    for axis in rules[name]:
      if axis in used or axis not in mesh.shape:
        continue
      n = mesh.shape[axis]
      if shape is not None and shape[i] % (size * n):
        continue
      axes.append(axis)
      size *= n
    used.update(axes)
    dims.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  while dims and dims[-1] is None:
    dims.pop()
  return P(*dims)


# The logical axis names an nnx Variable carries, or None (the optimizer
# reads them too: they mark the expert weights).
variable_names = optim.logical_names


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _leaf_spec(x: Any, mesh, rules) -> P:
  names = variable_names(x)
  shape = getattr(x, "shape", None)
  if names is None or shape is None or len(shape) != len(names):
    return P()
  return logical_to_spec(names, shape, mesh, rules)


def param_specs(params: Any, mesh: Any, rules: Optional[Rules] = None) -> Any:
  """PartitionSpecs, in the tree structure of `params` (Variables kept)."""
  def f(x):
    spec = _leaf_spec(x, mesh, rules)
    return x.replace(spec) if _is_var(x) else spec
  return jax.tree.map(f, params, is_leaf=_is_var)


def _per_matrix_specs(state: optim.PerMatrixState, params: Any, mesh,
                      rules, freeze: str = "") -> optim.PerMatrixState:
  """Specs of per-leaf Adafactor state: each entry follows its parameter.

  Entry i holds the inner state of parameter leaf i, vmapped over the
  parameter's batch axes (the expert axis of expert weights). Its arrays
  keep the parameter's names on those leading axes, and on the rest only
  when their shape is the parameter's (the unfactored second moment).
  """
  flat = [(path, p) for path, p in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_var)[0]  # frozen params have no state
          if not freeze_lib.is_frozen(freeze_lib.param_path(path), freeze)]
  if len(flat) != len(state.leaves):
    raise ValueError(
        f"optimizer state holds {len(state.leaves)} leaves, params have "
        f"{len(flat)}")
  out = []
  for (path, p), inner in zip(flat, state.leaves):
    names = variable_names(p)
    n, _ = optim._matrix_view(path, p.shape, names)  # pylint: disable=protected-access
    names = names or (None,) * len(p.shape)

    def f(x, names=names, shape=tuple(p.shape), n=n):
      s = tuple(x.shape)
      if s == shape:
        leaf_names = names
      elif s[:n] == shape[:n]:
        leaf_names = tuple(names[:n]) + (None,) * (len(s) - n)
      else:
        return P()
      return logical_to_spec(leaf_names, s, mesh, rules)
    out.append(jax.tree.map(f, inner))
  return optim.PerMatrixState(tuple(out))


def state_specs(abstract_state: Any, mesh: Any,
                rules: Optional[Rules] = None, freeze: str = "") -> Any:
  """PartitionSpecs for every leaf of a train state {step, params, opt_state}.

  Params from their logical names; optimizer state that mirrors the params
  (AdamW's mu/nu carry the same Variables) likewise; per-matrix Adafactor
  state via `_per_matrix_specs` (of the params that train under `freeze`,
  train.freeze); everything else replicated.
  """
  params = (abstract_state.get("params")
            if isinstance(abstract_state, dict) else None)

  def is_leaf(x):
    return _is_var(x) or isinstance(x, optim.PerMatrixState)

  def f(x):
    if isinstance(x, optim.PerMatrixState):
      if params is None:
        raise ValueError("Adafactor state needs the params next to it "
                         "(a state dict with 'params')")
      return _per_matrix_specs(x, params, mesh, rules, freeze)
    if _is_var(x) and not jax.tree.leaves(x):  # a frozen param's MaskedNode
      return x
    spec = _leaf_spec(x, mesh, rules)
    return x.replace(spec) if _is_var(x) else spec
  return jax.tree.map(f, abstract_state, is_leaf=is_leaf)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    rules: Optional[Rules] = None, freeze: str = "") -> Any:
  """NamedShardings for every leaf of the train state (see state_specs)."""
  specs = state_specs(abstract_state, mesh, rules, freeze)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh,
                   rules: Optional[Rules] = None) -> NamedSharding:
  """Leading (batch) axis over the 'batch' rule's axes, the rest replicated."""
  rules = DEFAULT_RULES if rules is None else rules
  return NamedSharding(mesh, logical_to_spec(("batch",), None, mesh, rules))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------
# Trace context: the mesh and rules that layers see while being traced.

def _flax_rules(rules: Rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Rules as flax's logical axis rules: (logical name, mesh axes) pairs."""
  return tuple(rules.items())


def current_rules() -> Rules:
  """The rules of the current trace (flax's `nnx.logical_axis_rules`, set by
  `in_mesh`); DEFAULT_RULES where none are set."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules:
    return DEFAULT_RULES
  return {name: (axes,) if isinstance(axes, str) else tuple(axes or ())
          for name, axes in rules}


def current_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The mesh of the current trace; None without one or with one device.

  One device needs no placement: layers then run their plain code.
  """
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def in_mesh(fn: Callable, mesh: jax.sharding.Mesh,
            rules: Optional[Rules] = None) -> Callable:
  """fn, traced with `mesh` (abstract) and `rules` as the layers' context."""
  rules = DEFAULT_RULES if rules is None else rules

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
          nnx.logical_axis_rules(_flax_rules(rules))):
      return fn(*args, **kwargs)
  return wrapped


def axes_of(name: str, mesh: Any, rules: Optional[Rules] = None
            ) -> tuple[str, ...]:
  """The mesh axes (present in `mesh`) that logical `name` maps to."""
  rules = current_rules() if rules is None else rules
  return tuple(a for a in rules.get(name, ()) if a in mesh.shape)


def axes_size(axes: Sequence[str], mesh: Any) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def group_axes(num_groups: int, mesh: Any,
               rules: Optional[Rules] = None) -> tuple[str, ...]:
  """Mesh axes for the G axis of routing groups [G, S, M].

  Groups are split like the batch; axes whose sizes do not divide G are
  left out (greedily, in order), so a group never straddles devices: routing
  needs no communication and every group holds the same tokens on any mesh.
  """
  axes, size = [], 1
  for axis in axes_of("batch", mesh, rules):
    if num_groups % (size * mesh.shape[axis]) == 0:
      axes.append(axis)
      size *= mesh.shape[axis]
  return tuple(axes)


def spec(*dims: Any) -> P:
  """PartitionSpec from per-dimension tuples of mesh axes (() = replicated)."""
  out = []
  for d in dims:
    d = tuple(d or ())
    out.append(d if len(d) > 1 else (d[0] if d else None))
  return P(*out)


def constrain(x: jax.Array, partition: P) -> jax.Array:
  """with_sharding_constraint on the current mesh; a no-op without one."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition))


def with_logical_constraint(x: jax.Array,
                            names: Sequence[Optional[str]]) -> jax.Array:
  """Constrains activation x to its logical axis `names` under the current
  mesh and rules (axes that do not divide a dimension are left out); a no-op
  without a mesh."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return constrain(x, logical_to_spec(names, x.shape, mesh, current_rules()))
