"""Bytes per device of a training step on a mesh, and the smallest mesh that fits.

Without hardware: the train state (params, Adafactor's or AdamW's moments)
from abstract shapes, each leaf's shard on an `AbstractMesh` exactly as
`switchjax.partitioning` places it; gradients as large as the params (f32,
placed like them); activations from `switchjax.cost_model`. Used by
`switchjax.plan` and by `switchjax.main`, which refuses a run whose
estimate does not fit its devices before it allocates anything.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Any, Iterator, Mapping, Optional

import jax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
import ml_collections

from switchjax import cost_model
from switchjax import partitioning

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10,
          "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20, "g": 2 ** 30,
          "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12,
          "tib": 2 ** 40}
# The largest device count searched for a mesh that fits (2^16).
MAX_DEVICES = 65536


def parse_bytes(text: str) -> int:
  """'32GiB', '16 GB', '80g', '1.5TiB' -> bytes (k/m/g/t alone are binary)."""
  s = text.strip().lower().replace(" ", "")
  number = s.rstrip("kmgtib")
  unit = s[len(number):]
  try:
    value = float(number) * _UNITS[unit]
  except (KeyError, ValueError):
    raise ValueError(f"not a memory size: {text!r} (e.g. 32GiB, 16GB, "
                     "80g)") from None
  if not value > 0:
    raise ValueError(f"memory size must be > 0, got {text!r}")
  return int(value)


def fmt_bytes(n: float) -> str:
  """Binary units, three significant figures: 1.57 TiB, 830 MiB."""
  for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20),
                     ("KiB", 2 ** 10)):
    if abs(n) >= size:
      return f"{n / size:.3g} {unit}"
  return f"{n:.0f} B"


def fmt_mesh(mesh: Mapping[str, int]) -> str:
  return ",".join(f"{a}={mesh[a]}" for a in partitioning.MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes per device of one training step on `mesh`."""
  mesh: dict[str, int]
  params: int
  grads: int
  optimizer: int  # optimizer state and the step counters
  activations: int
  all_to_all: int  # bytes a device sends per step (MoE dispatch + combine)

  @property
  def state(self) -> int:
    return self.params + self.optimizer

  @property
  def total(self) -> int:
    return self.params + self.grads + self.optimizer + self.activations

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  def parts(self) -> str:
    return (f"params {fmt_bytes(self.params)}, grads {fmt_bytes(self.grads)}, "
            f"optimizer {fmt_bytes(self.optimizer)}, activations "
            f"{fmt_bytes(self.activations)}")


def _shard_bytes(leaf: jax.ShapeDtypeStruct, spec: P, mesh: AbstractMesh) -> int:
  shape = NamedSharding(mesh, spec).shard_shape(leaf.shape)
  return math.prod(shape) * leaf.dtype.itemsize


def state_bytes(abstract_state: Any, mesh: Mapping[str, int],
                rules: partitioning.Rules, freeze: str = "") -> tuple[int, int]:
  """(params, everything else) bytes per device of the train state
  (`freeze`: its train.freeze)."""
  amesh = AbstractMesh(tuple(mesh[a] for a in partitioning.MESH_AXES),
                       partitioning.MESH_AXES)
  specs = partitioning.state_specs(abstract_state, amesh, rules, freeze)
  is_spec = lambda x: isinstance(x, P)  # pylint: disable=unnecessary-lambda-assignment
  sizes = {}
  for key in abstract_state:
    leaves = jax.tree.leaves(abstract_state[key])
    leaf_specs = jax.tree.leaves(specs[key], is_leaf=is_spec)
    sizes[key] = sum(_shard_bytes(x, s, amesh)
                     for x, s in zip(leaves, leaf_specs, strict=True))
  params = sizes.pop("params")
  return params, sum(sizes.values())


def _shards(config: ml_collections.ConfigDict, mesh: Mapping[str, int],
            rules: partitioning.Rules) -> cost_model.Shards:
  """How the activations split on `mesh` (partitioning's rules for the
  batch and for the heads)."""
  def size(name: str, dim: int) -> int:
    n = 1
    for axis in rules.get(name, ()):
      if dim % (n * mesh.get(axis, 1)) == 0:
        n *= mesh.get(axis, 1)
    return n
  return cost_model.Shards(batch=size("batch", config.train.batch_size),
                           model=size("heads", config.model.num_heads))


def estimate(config: ml_collections.ConfigDict, abstract_state: Any,
             mesh: Mapping[str, int]) -> Estimate:
  """The bytes per device of a training step of `config` on `mesh`
  ({'data': d, 'expert': x, 'model': m}); `abstract_state` is its train
  state's ShapeDtypeStructs (train.abstract_train_state)."""
  rules = partitioning.rules_from_config(config)
  params, rest = state_bytes(abstract_state, mesh, rules, config.train.freeze)
  return Estimate(
      mesh=dict(mesh), params=params, grads=params, optimizer=rest,
      activations=int(cost_model.activation_bytes(
          config, _shards(config, mesh, rules))),
      all_to_all=int(cost_model.all_to_all_bytes(config, mesh)))


def meshes(config: ml_collections.ConfigDict, devices: int
           ) -> Iterator[dict[str, int]]:
  """The (data, expert, model) meshes of `devices` that config can run on:
  the expert axis divides the experts, the model axis the heads, and data x
  expert the batch."""
  experts = config.moe.num_experts
  for x, m in itertools.product(_divisors(devices), repeat=2):
    if devices % (x * m):
      continue
    d = devices // (x * m)
    if ((experts and experts % x) or (not experts and x > 1)
        or config.model.num_heads % m
        or config.train.batch_size % (d * x)):
      continue
    yield {"data": d, "expert": x, "model": m}


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def smallest_fit(config: ml_collections.ConfigDict, abstract_state: Any,
                 device_memory: int, devices: Optional[int] = None
                 ) -> Optional[Estimate]:
  """The mesh of fewest devices (powers of 2; only `devices` if given) whose
  estimate fits `device_memory`; of those, the least bytes per device. None
  when nothing up to MAX_DEVICES fits."""
  counts = ([devices] if devices else
            [2 ** k for k in range(int(math.log2(MAX_DEVICES)) + 1)])
  for n in counts:
    fits = [e for e in (estimate(config, abstract_state, mesh)
                        for mesh in meshes(config, n))
            if e.total <= device_memory]
    if fits:
      # Fewest bytes; then the most data parallelism (the least communication).
      return min(fits, key=lambda e: (e.total, -e.mesh["data"]))
  return None


def _cgroup_limit() -> Optional[int]:
  for path in ("/sys/fs/cgroup/memory.max",
               "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit():
      return int(text)
  return None


def device_memory(device: jax.Device) -> Optional[int]:
  """Bytes a device can hold: its allocator's limit on an accelerator; on
  CPU the host's memory (or its cgroup limit) shared by the local CPU
  devices. None where neither is known."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform != "cpu":
    return None
  try:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return None
  limit = _cgroup_limit()
  if limit:
    host = min(host, limit)
  return host // max(1, jax.local_device_count("cpu"))


def refusal(config: ml_collections.ConfigDict, abstract_state: Any,
            devices: list[jax.Device]) -> Optional[str]:
  """Why a run of `config` on `devices` cannot fit them, in one line; None
  when its estimate fits (or the device memory is unknown)."""
  local = [d for d in devices if d.process_index == jax.process_index()]
  memory = device_memory((local or devices)[0])
  if memory is None:
    return None
  shape = partitioning.check_mesh(config, len(devices))
  need = estimate(config, abstract_state,
                  dict(zip(partitioning.MESH_AXES, shape)))
  if need.total <= memory:
    return None
  kind = (f"the one {devices[0].platform} device holds" if len(devices) == 1
          else f"each of the {len(devices)} {devices[0].platform} devices holds")
  fit = smallest_fit(config, abstract_state, memory)
  where = (f"it fits on {fit.devices} devices of this size as mesh "
           f"{fmt_mesh(fit.mesh)} ({fmt_bytes(fit.total)} each)" if fit else
           f"no mesh of up to {MAX_DEVICES} such devices holds it")
  return (f"this run needs {fmt_bytes(need.total)} per device on mesh "
          f"{fmt_mesh(need.mesh)} ({need.parts()}), but {kind} "
          f"{fmt_bytes(memory)}: {where}; `python -m switchjax.plan` "
          "plans other meshes and device sizes, a smaller preset (:tiny) "
          "runs here, and --nocheck_memory starts it anyway")
