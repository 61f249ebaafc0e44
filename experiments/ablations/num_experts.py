"""More experts at equal active FLOPs (Switch Figure 4).

Fedus et al. 2021, Figure 4: Switch-Base with 2 to 256 experts, top-1, each
expert as wide as T5-Base's FFN, so every model spends the same FLOPs per
token; the loss falls steadily with the number of experts, and the dense
T5-Base (1 expert) is worst. Here: dense, then 2, 4, 8, 16, 32 experts (full
form: up to 256, as the figure).
"""
from switchjax import grid


def get_config(arg=None):
  preset = arg or "full"
  g = grid.base_grid("num_experts", "experiments/switch_base.py", preset)
  g.description = __doc__
  counts = (2, 4, 8, 16, 32) if preset == "tiny" else (
      2, 4, 8, 16, 32, 64, 128, 256)
  # dense sits on the axis (at x = "dense") rather than as a reference line.
  g.axes = (grid.variants(
      dense={"moe.num_experts": 0},
      **{f"e{n}": {"moe.num_experts": n} for n in counts}),)
  g.x_axis = "moe.num_experts"
  if preset == "tiny":
    g.overrides.train = {"num_steps": 300}
    g.loss_threshold = 5.5
  else:
    g.loss_threshold = 1.5
  return g
