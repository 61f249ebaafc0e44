"""T5-Large, the dense baseline FLOP-matched to Switch-Large (Fedus et al. 2021, Table 9).

T5.1.1 shapes (GEGLU d_ff 2816, untied embeddings): 783M params, the Switch
paper's "0.7B" (its §4.1 cites the original 739M T5-Large). Same
pre-training protocol as the Switch models.
"""
from switchjax import config_base


def get_config(arg=None):
  c = config_base.switch_pretraining(config_base.base_config())
  m = c.model
  # Table 9: d_model 1024, GEGLU d_ff 2816, d_kv 64, 16 heads, 24 + 24 layers.
  m.d_model, m.d_ff, m.head_dim, m.num_heads = 1024, 2816, 64, 16
  m.num_encoder_layers = m.num_decoder_layers = 24
  m.activation = "gated_gelu"
  c.moe.num_experts = 0  # dense
  return config_base.apply_preset(c, arg)
