r"""Plans a run without hardware: parameters, FLOPs, memory per device, meshes.

  python -m switchjax.plan --config experiments/switch_c.py \
      [--devices 2048] [--device_memory 32GiB] \
      [--config.mesh.data=1 --config.mesh.expert=2048 ...]

Prints the parameter counts (total, active per token) against the paper's,
the training FLOPs per sequence and per token (switchjax.cost_model's
convention), the bytes per device of params, gradients, optimizer state and
activations on the config's mesh over --devices (default: this machine's
devices) with the all-to-all bytes per step, whether that fits
--device_memory (default: this machine's device memory), and the smallest
mesh of such devices that fits. Nothing is allocated: the numbers come from
abstract shapes (switchjax.memory_plan).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from switchjax import config_base

# Paper figures: experiment file -> (total params, forward FLOPs per
# sequence or None, source). FLOPs/seq are Switch Table 9's.
PAPER = {
    "t5_base": (247_577_856, 124e9,
                "t5-v1_1-base as released; Table 9: 0.2B, 124B FLOPs/seq"),
    "t5_large": (783_150_080, 425e9,
                 "t5-v1_1-large as released; Table 9: 0.7B, 425B FLOPs/seq"),
    "switch_base": (7.41e9, 124e9, "Fedus et al. 2021 §4.2, Table 9"),
    "switch_large": (26.3e9, 425e9, "Fedus et al. 2021 Table 9"),
    "switch_xxl": (395e9, 6.3e12, "Fedus et al. 2021 Table 9"),
    "switch_c": (1571e9, 890e9, "Fedus et al. 2021 Table 9"),
    "gshard": (600e9, None, "Lepikhin et al. 2020 Table 1"),
    "st_moe": (269e9, None, "Zoph et al. 2022 Table 2 (ST-MoE-32B)"),
}


def paper_figures(config_arg: str) -> Optional[tuple]:
  """PAPER's entry of a paper config at its full size ('x.py' or 'x.py:full')."""
  path, _, preset = config_arg.partition(":")
  if preset not in ("", "full"):
    return None
  return PAPER.get(os.path.splitext(os.path.basename(path))[0])


def plan(config, *, devices: int, device_memory: int,
         paper: Optional[tuple] = None) -> dict[str, Any]:
  """The plan of `config` on `devices` devices of `device_memory` bytes."""
  # Imported here so that --help and flag errors answer without JAX.
  from switchjax import cost_model  # pylint: disable=g-import-not-at-top
  from switchjax import memory_plan  # pylint: disable=g-import-not-at-top
  from switchjax import model  # pylint: disable=g-import-not-at-top
  from switchjax import partitioning  # pylint: disable=g-import-not-at-top
  from switchjax import train  # pylint: disable=g-import-not-at-top
  total, active = model.param_counts(config)
  fwd = cost_model.forward_flops_per_sequence(config)
  tokens = cost_model.tokens_per_sequence(config)
  state = train.abstract_train_state(config)
  mesh = dict(zip(partitioning.MESH_AXES,
                  partitioning.check_mesh(config, devices)))
  on_mesh = memory_plan.estimate(config, state, mesh)
  return {
      "params": total, "active_params": active, "paper": paper,
      "forward_flops": fwd, "tokens_per_sequence": tokens,
      "train_flops_per_sequence": 3 * fwd["total"],
      "device_memory": device_memory, "estimate": on_mesh,
      "fits": on_mesh.total <= device_memory,
      "smallest_fit": memory_plan.smallest_fit(config, state, device_memory),
  }


def table9_flops(fwd: dict[str, float]) -> float:
  """Forward FLOPs per sequence as Switch Table 9 counts them: projections
  and FFNs/experts; no attention scores, router or output logits (this
  reproduces its T5-Base / Switch-Base 124B exactly)."""
  return fwd["attention"] + fwd["ffn"] + fwd["experts"]


def _versus(ours: float, paper: Optional[float]) -> str:
  return f" (paper {paper:.4g}: {100 * (ours / paper - 1):+.1f} %)" if paper else ""


def _devices(n: int) -> str:
  return f"{n} device" + ("s" if n > 1 else "")


def format_plan(p: dict[str, Any]) -> str:
  from switchjax import memory_plan as mp  # pylint: disable=g-import-not-at-top
  paper = p["paper"] or (None, None, "")
  e, fwd = p["estimate"], p["forward_flops"]
  lines = [
      f"parameters: {p['params']:,} total{_versus(p['params'], paper[0])}, "
      f"{p['active_params']:,} active per token",
      f"training FLOPs (matmuls, 3x forward): {p['train_flops_per_sequence']:.4g} "
      f"per sequence of {p['tokens_per_sequence']} tokens, "
      f"{p['train_flops_per_sequence'] / p['tokens_per_sequence']:.4g} per token",
      f"forward FLOPs per sequence: {fwd['total']:.4g} (attention "
      f"{fwd['attention']:.3g}, scores {fwd['scores']:.3g}, ffn "
      f"{fwd['ffn']:.3g}, experts {fwd['experts']:.3g}, router "
      f"{fwd['router']:.3g}, logits {fwd['logits']:.3g}); as Table 9 counts "
      f"(no scores, router, logits): {table9_flops(fwd):.4g}"
      f"{_versus(table9_flops(fwd), paper[1])}",
      f"mesh {mp.fmt_mesh(e.mesh)} ({_devices(e.devices)}): per device "
      f"{mp.fmt_bytes(e.total)} = {e.parts()}; all-to-all "
      f"{mp.fmt_bytes(e.all_to_all)} sent per step",
      f"fits {mp.fmt_bytes(p['device_memory'])} per device: "
      f"{'yes' if p['fits'] else 'no'}",
  ]
  fit = p["smallest_fit"]
  lines.append(
      f"smallest mesh of {mp.fmt_bytes(p['device_memory'])} devices that fits: "
      + (f"{_devices(fit.devices)}, {mp.fmt_mesh(fit.mesh)}: {mp.fmt_bytes(fit.total)} "
         f"per device = {fit.parts()}; all-to-all {mp.fmt_bytes(fit.all_to_all)}"
         if fit else f"none of up to {mp.MAX_DEVICES} devices"))
  if paper[2]:
    lines.append(f"paper figures: {paper[2]}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from switchjax import memory_plan  # pylint: disable=g-import-not-at-top
  from switchjax import validate  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    config = FLAGS.config
    memory = (memory_plan.parse_bytes(FLAGS.device_memory)
              if FLAGS.device_memory else
              memory_plan.device_memory(jax.local_devices()[0]))
    if memory is None:
      raise ValueError("this machine's device memory is unknown: give "
                       "--device_memory (e.g. 32GiB)")
    devices = FLAGS.devices or jax.device_count()
    validate.check_config(config, devices)
    p = plan(config, devices=devices, device_memory=memory,
             paper=paper_figures(config_base.config_arg(sys.argv)))
  except (ValueError, validate.ConfigError) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(format_plan(p))


if __name__ == "__main__":
  config_flags.DEFINE_config_file(
      "config", None, "Experiment file, e.g. experiments/switch_c.py.",
      lock_config=True)
  flags.DEFINE_integer("devices", 0, "Devices of the mesh to plan "
                       "(config.mesh over them); default: this machine's.")
  flags.DEFINE_string("device_memory", "", "Memory per device, e.g. 32GiB, "
                      "80GB; default: this machine's device memory.")
  flags.mark_flags_as_required(["config"])
  FLAGS = flags.FLAGS
  app.run(main)
