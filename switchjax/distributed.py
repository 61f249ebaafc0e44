"""Multi-process (multi-host) start-up: `jax.distributed.initialize`.

One process per host (TPU VM host, GPU node, or several per CPU machine for
tests), all running the same command. The processes find each other through
a coordinator, given by flags:

  python -m switchjax.main ... --coordinator_address=host0:1234 \
      --num_processes=4 --process_id=$RANK

or, without flags, from the environment where JAX detects the cluster
itself: Cloud TPU pods (GCE / GKE), SLURM (`srun`), Open MPI (`mpirun`),
and JAX's own `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`). With neither, the run is a single process.

It must run before anything touches a JAX device. Afterwards
`jax.devices()` lists every process's devices, the mesh spans them all, each
process feeds its own rows of the batch (`jax.process_index()`), process 0
alone writes logs and metrics, and orbax writes checkpoints collectively.
CPU processes exchange data with gloo collectives.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator, for multi-process runs. Unset: "
    "auto-detected on TPU pods, SLURM and Open MPI, else single-process.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes).")

# Environment variables by which JAX recognises a multi-process cluster
# (jax._src.clusters): any one of them present makes a flagless call
# initialize from the environment. Not JAX's own `ClusterEnv.is_env_present()`:
# that is private API, and its checks have side effects this one must not
# have (on a TPU VM it queries the GCE metadata server, on any Kubernetes pod
# it imports `kubernetes` and loads the in-cluster config).
_CLUSTER_ENV = {
    "JAX_COORDINATOR_ADDRESS": "JAX environment variables",
    "SLURM_JOB_ID": "SLURM",
    "OMPI_MCA_orte_hnp_uri": "Open MPI",
    "TPU_WORKER_HOSTNAMES": "Cloud TPU",
    "MEGASCALE_COORDINATOR_ADDRESS": "Cloud TPU multislice",
}


def detected_cluster() -> Optional[str]:
  """The cluster the environment describes with more than one process, or None."""
  if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) < 2:
    return None  # one task: a plain single-process job under SLURM
  if "TPU_WORKER_HOSTNAMES" in os.environ and len(
      [h for h in os.environ["TPU_WORKER_HOSTNAMES"].split(",") if h]) < 2:
    return None  # a single-host TPU VM
  for var, name in _CLUSTER_ENV.items():
    if os.environ.get(var):
      return name
  return None


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None) -> bool:
  """Joins the processes of a multi-process run; False for a single process.

  With a coordinator address, num_processes and process_id are required
  (unless the cluster environment supplies them). Without one, initializes
  from the environment when `detected_cluster()` finds a cluster.
  Raises ValueError for inconsistent arguments.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.distributed.is_initialized():
    return True
  given = [coordinator_address is not None, num_processes is not None,
           process_id is not None]
  cluster = detected_cluster()
  if not any(given) and cluster is None:
    return False
  if any(given) and cluster is None and not all(given):
    raise ValueError(
        "multi-process run: --coordinator_address, --num_processes and "
        "--process_id go together (no SLURM / MPI / TPU cluster detected to "
        "fill in the missing ones)")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"--process_id must be in [0, {num_processes}), got "
                     f"{process_id}")
  if num_processes == 1:
    return False
  # CPU processes need cross-process collectives (gloo); a no-op elsewhere.
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids)
  return True


def initialize_from_flags() -> bool:
  """`initialize` with --coordinator_address, --num_processes, --process_id."""
  return initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
