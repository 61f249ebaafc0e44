"""Prints the README's table of plans for the paper configs (switchjax.plan).

  python scripts/plan_table.py [--device_memory 32GiB 80GiB]

Per experiment at its full size: parameters (total, active per token)
against the paper's, forward FLOPs per sequence as Switch Table 9 counts
them against the table, and for each device size the smallest mesh that
holds a training step (no remat, the config's batch) with its bytes per
device. Nothing is allocated: abstract shapes and the cost model only.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from switchjax import grid  # pylint: disable=wrong-import-position
from switchjax import memory_plan  # pylint: disable=wrong-import-position
from switchjax import plan  # pylint: disable=wrong-import-position

EXPERIMENTS = ("t5_base", "switch_base", "t5_large", "switch_large",
               "switch_xxl", "switch_c", "gshard", "st_moe", "expert_choice")


def _count(n: float) -> str:
  return f"{n / 1e12:.3g}T" if n >= 1e12 else (
      f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M")


def _versus(ours: float, paper) -> str:
  if not paper:
    return _count(ours)
  return f"{_count(ours)} ({_count(paper)}, {100 * (ours / paper - 1):+.1f} %)"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--device_memory", nargs="+", default=["32GiB", "80GiB"])
  args = p.parse_args()
  sizes = [memory_plan.parse_bytes(s) for s in args.device_memory]
  head = ["experiment", "params (paper, diff)", "active",
          "FLOPs/seq, Table 9 count (paper, diff)"] + [
              f"smallest mesh of {memory_plan.fmt_bytes(s)} devices"
              for s in sizes]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for name in EXPERIMENTS:
    config = grid.load_experiment(f"experiments/{name}.py", "")
    paper = plan.PAPER.get(name) or (None, None, "")
    row = None
    meshes = []
    for size in sizes:
      row = plan.plan(config, devices=1, device_memory=size, paper=paper)
      fit = row["smallest_fit"]
      meshes.append(
          f"{fit.devices}: {memory_plan.fmt_mesh(fit.mesh)}, "
          f"{memory_plan.fmt_bytes(fit.total)}" if fit else "none")
    flops = plan.table9_flops(row["forward_flops"])
    print("| " + " | ".join(
        [name, _versus(row["params"], paper[0]), _count(row["active_params"]),
         _versus(flops, paper[1])] + meshes) + " |", flush=True)


if __name__ == "__main__":
  main()
