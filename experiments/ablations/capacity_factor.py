"""Capacity factor, top-1 vs top-2, vs the dense baseline (Switch Table 1).

Fedus et al. 2021, Table 1: Switch-Base (top-1) and MoE-Base (top-2) with
128 experts at train capacity factors 1.0 / 1.25 / 2.0, against the
FLOP-matched T5-Base, all for 100k steps; they report quality
(neg. log perplexity at 100k steps), time to a quality threshold of -1.50,
and speed. Fewer dropped tokens as the factor grows, at the cost of speed
(bigger expert buffers); top-2 beats top-1 per step but is slower.

Cells: top1_cf1.0 ... top2_cf2.0 and `dense` (num_experts = 0). The tiny
form adds a second seed of `dense` and `top1_cf1.25` to show seed noise.
"""
from switchjax import grid


def get_config(arg=None):
  preset = arg or "full"
  g = grid.base_grid("capacity_factor", "experiments/switch_base.py", preset)
  g.description = __doc__
  g.axes = (
      grid.zipped(("moe.router", "moe.num_selected"),
                  (("switch", 1), ("gshard", 2)), labels=("top1", "top2")),
      grid.axis("moe.train_capacity_factor", (1.0, 1.25, 2.0), label="cf"),
  )
  extra = {"dense": {"moe.num_experts": 0}}
  g.x_axis = "moe.train_capacity_factor"
  if preset == "tiny":
    # 300 steps: the loss falls from ~9 to ~5 in ~2 minutes a cell.
    g.overrides.train = {"num_steps": 300}
    extra.update({
        "dense_seed1": {"moe.num_experts": 0, "seed": 1},
        "top1_cf1.25_seed1": {"moe.router": "switch", "moe.num_selected": 1,
                              "moe.train_capacity_factor": 1.25, "seed": 1},
    })
    g.loss_threshold = 5.5
  else:
    g.overrides.train = {"num_steps": 100_000}  # Table 1: quality at 100k steps
    g.loss_threshold = 1.5  # Table 1: time to neg. log perplexity -1.50
  g.cells = grid.variants(**extra)
  return g
