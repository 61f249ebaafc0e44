"""T5-Base, the dense baseline FLOP-matched to Switch-Base (Fedus et al. 2021, Table 9).

T5.1.1 shapes (GEGLU d_ff 2048, untied embeddings): 248M params, the Switch
paper's "0.2B" (its §4.1 cites the original T5-Base: ReLU d_ff 3072, tied
embeddings, 223M). Same pre-training protocol as the Switch models.
"""
from switchjax import config_base


def get_config(arg=None):
  c = config_base.switch_pretraining(config_base.base_config())
  m = c.model
  # Table 9: d_model 768, GEGLU d_ff 2048, d_kv 64, 12 heads, 12 + 12 layers.
  m.d_model, m.d_ff, m.head_dim, m.num_heads = 768, 2048, 64, 12
  m.num_encoder_layers = m.num_decoder_layers = 12
  m.activation = "gated_gelu"
  c.moe.num_experts = 0  # dense
  return config_base.apply_preset(c, arg)
