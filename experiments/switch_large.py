"""Switch-Large (Fedus et al. 2021, Table 9): T5-Large with 128 experts in every other FFN.

Paper vs released checkpoint: Table 9 gives GEGLU with d_ff 2816; the released
switch-large-128 (T5X switch_classic_large.gin) uses ReLU with d_ff 4096. We
follow the paper. ~26B params (Table 9).
"""
from switchjax import config_base


def get_config(arg=None):
  c = config_base.switch_pretraining(config_base.base_config())
  m, e = c.model, c.moe
  # Table 9: d_model 1024, GEGLU d_ff 2816, d_kv 64, 16 heads, 24 + 24 layers.
  m.d_model, m.d_ff, m.head_dim, m.num_heads = 1024, 2816, 64, 16
  m.num_encoder_layers = m.num_decoder_layers = 24
  m.activation = "gated_gelu"
  # Table 9: 128 experts, expert frequency 1/2.
  e.num_experts = 128
  e.sparse_every = 2
  e.group_size = 4096  # T5X switch_classic_large.gin
  return config_base.apply_preset(c, arg)
