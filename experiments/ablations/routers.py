"""Routers side by side: Switch top-1, GShard top-2, expert choice, noisy top-k.

  switch        top-1 (Fedus et al. 2021), capacity factor 1.25
  gshard        top-2 (Lepikhin et al. 2020, Algorithm 1), capacity factor 1.25
  gshard_cf2    top-2 at capacity factor 2.0: the token-choice twin of
                expert_choice (same capacity, same compute)
  expert_choice expert choice in the encoder (Zhou et al. 2022, EC-CF2: each
                expert takes 2S/E tokens, two experts per token on average,
                the compute of top-2) and top-2 token choice in the decoder,
                where expert choice would leak future tokens
  noisy_topk    noisy top-2 gating (Shazeer et al. 2017) with its importance
                and load losses at their weight 0.1
All share the base experiment's model, experts and training protocol.
"""
from switchjax import grid


def get_config(arg=None):
  preset = arg or "full"
  g = grid.base_grid("routers", "experiments/switch_base.py", preset)
  g.description = __doc__
  g.axes = (grid.variants(
      switch={"moe.router": "switch", "moe.num_selected": 1},
      gshard={"moe.router": "gshard", "moe.num_selected": 2},
      gshard_cf2={"moe.router": "gshard", "moe.num_selected": 2,
                  "moe.train_capacity_factor": 2.0},
      expert_choice={"moe.encoder_router": "expert_choice",
                     "moe.router": "gshard", "moe.num_selected": 2,
                     "moe.train_capacity_factor": 2.0},
      noisy_topk={"moe.router": "noisy_topk", "moe.num_selected": 2,
                  "moe.aux_loss_coef": 0.1},
  ),)
  if preset == "tiny":
    g.overrides.train = {"num_steps": 200}
    g.loss_threshold = 5.5
  else:
    g.overrides.train = {"num_steps": 100_000}
    g.loss_threshold = 1.5
  return g
