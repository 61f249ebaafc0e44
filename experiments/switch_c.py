"""Switch-C (Fedus et al. 2021, Table 9): 1.6T params, 2048 experts in every FFN.

Built for expert parallelism only (§5.6), so narrow: ReLU FFN (no GEGLU).
Paper vs released checkpoint: Table 9 gives 32 heads; the released
switch-c-2048 (T5X switch_classic_c.gin) has 30. We follow the paper.
"""
from switchjax import config_base


def get_config(arg=None):
  c = config_base.switch_pretraining(config_base.base_config())
  m, e, t = c.model, c.moe, c.train
  # Table 9: d_model 2080, ReLU d_ff 6144, d_kv 64, 32 heads, 15 + 15 layers.
  m.d_model, m.d_ff, m.head_dim, m.num_heads = 2080, 6144, 64, 32
  m.num_encoder_layers = m.num_decoder_layers = 15
  m.activation = "relu"
  # Table 9: 2048 experts, expert frequency 1 (every FFN is sparse).
  e.num_experts = 2048
  e.sparse_every = 1
  # T5X switch_classic_c.gin: group 2048, capacity 1.0 / 2.0, min capacity 2.
  e.group_size = 2048
  e.train_capacity_factor = 1.0
  e.eval_capacity_factor = 2.0
  e.min_capacity = 2
  t.num_steps = 500_000  # Table 9 reports quality at 250k and 500k steps
  return config_base.apply_preset(c, arg)
