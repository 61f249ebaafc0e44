"""Training stability: router precision, init scale, router z-loss (Switch Tables 2-3).

Fedus et al. 2021, Table 2: with a bfloat16 model, a bfloat16 router
diverges while a float32 router ("selective precision") is as stable as a
float32 model and as fast as bfloat16. Table 3: weights drawn with scale 0.1
instead of T5's 1.0 give better and less variable quality (-2.72 +- 0.01
vs -3.60 +- 0.68 neg. log perplexity early in training, over 3 seeds).
Zoph et al. 2022 (ST-MoE) add the router z-loss (1e-3) for stability.

Cells: router_dtype x init_scale x z-loss, all with a bfloat16 model.
"""
from switchjax import grid


def get_config(arg=None):
  preset = arg or "full"
  g = grid.base_grid("stability", "experiments/switch_base.py", preset)
  g.description = __doc__
  g.overrides.model = {"dtype": "bfloat16"}  # the tiny preset runs float32
  g.axes = (
      grid.variants(router32={"moe.router_dtype": "float32"},
                    router16={"moe.router_dtype": "bfloat16"}),
      grid.axis("model.init_scale", (0.1, 1.0), label="init"),
      grid.variants(noz={"moe.z_loss_coef": 0.0},
                    zloss={"moe.z_loss_coef": 1e-3}),
  )
  g.x_axis = "model.init_scale"
  if preset == "tiny":
    g.overrides.train = {"num_steps": 200}
    g.loss_threshold = 5.5
  else:
    g.overrides.train = {"num_steps": 100_000}
    g.loss_threshold = 1.5
  return g
