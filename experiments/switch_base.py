"""Switch-Base (Fedus et al. 2021, Table 9): T5-Base with 128 experts in every other FFN.

Paper vs released checkpoint: Table 9 gives GEGLU with d_ff 2048; the released
switch-base-128 (T5X switch_classic_base.gin) uses ReLU with d_ff 3072, the
same parameter count. We follow the paper. ~7.4B params (§4.2: 7410M).
"""
from switchjax import config_base


def get_config(arg=None):
  c = config_base.switch_pretraining(config_base.base_config())
  m, e = c.model, c.moe
  # Table 9: d_model 768, GEGLU d_ff 2048, d_kv 64, 12 heads, 12 + 12 layers.
  m.d_model, m.d_ff, m.head_dim, m.num_heads = 768, 2048, 64, 12
  m.num_encoder_layers = m.num_decoder_layers = 12
  m.activation = "gated_gelu"
  # Table 9: 128 experts, expert frequency 1/2.
  e.num_experts = 128
  e.sparse_every = 2
  # T5X's classic Base uses 8192, which does not divide the 2048 x 114 decoder
  # tokens of a batch; 4096 (T5X's Large/XXL value) does.
  e.group_size = 4096
  return config_base.apply_preset(c, arg)
