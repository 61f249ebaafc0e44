"""Device mesh ('data', 'expert', 'model') and the shardings of a train run.

Tokens (the batch) are split over 'data' and 'expert' together, as t5x's MoE
partitioner does: every device holds a slice of the batch, and expert
parallelism moves tokens, not weights.
"""
from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")


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


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  shape = mesh_shape(config, jax.device_count())
  # Auto axes: GSPMD decides the layouts between the constraints we set.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over data x expert, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for every leaf of the train state (params, optimizer, step)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)
