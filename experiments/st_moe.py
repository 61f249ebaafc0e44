"""ST-MoE-32B (Zoph et al. 2022): 269B params, the FLOPs of a 32B dense model.

Top-2 routing, load-balancing loss 1e-2 plus the router z-loss 1e-3 that the
paper introduces for stability, capacity factor 1.25 / 2.0 at eval, 64
experts in every fourth FFN. Shapes from the paper's model table and T5X
st_moe_32b.gin. Difference: ST-MoE adds a dense FFN next to each sparse one
(sparse-dense stacking; T5X `extra_mlp`), which our model does not have, so
this has ~265B params instead of 269B.
"""
from switchjax import config_base


def get_config(arg=None):
  c = config_base.switch_pretraining(config_base.base_config())
  m, e = c.model, c.moe
  # d_model 5120, GEGLU d_ff 20480, d_kv 128, 64 heads, 24 + 24 layers.
  m.d_model, m.d_ff, m.head_dim, m.num_heads = 5120, 20480, 128, 64
  m.num_encoder_layers = m.num_decoder_layers = 24
  m.activation = "gated_gelu"
  e.num_experts = 64
  e.sparse_every = 4  # expert frequency 1/4
  e.router = "topk"
  e.num_selected = 2
  e.train_capacity_factor = 1.25
  e.eval_capacity_factor = 2.0
  e.group_size = 4096  # T5X st_moe_32b.gin
  e.aux_loss_coef = 1e-2  # c_B
  e.z_loss_coef = 1e-3  # c_z, router z-loss (ST-MoE eq. 5)
  e.router_jitter = 0.0  # T5X's ST-MoE configs use no jitter
  return config_base.apply_preset(c, arg)
