"""Expert-choice routing (Zhou et al. 2022) in a T5-Base encoder-decoder.

Zhou et al. evaluate decoder-only GLaM-style models; expert choice is not
causal (each expert picks from the whole group), so as T5X's
experts_choose_base.gin we use it in the encoder only and top-2 token choice
in the decoder. Shapes and group size from experts_choose_base.gin.
"""
from switchjax import config_base


def get_config(arg=None):
  c = config_base.switch_pretraining(config_base.base_config())
  m, e = c.model, c.moe
  m.d_model, m.d_ff, m.head_dim, m.num_heads = 768, 2048, 64, 12
  m.num_encoder_layers = m.num_decoder_layers = 12
  m.activation = "gated_gelu"
  e.num_experts = 64
  e.sparse_every = 2
  e.encoder_router = "expert_choice"
  # Decoder: top-2 token choice as T5X's TokensChooseMaskedRouter, which
  # combines with the raw (not renormalised) router probabilities.
  e.router = e.decoder_router = "topk"
  e.num_selected = 2
  e.normalize_weights = False
  # EC-CF2 (Zhou et al.): capacity 2S/E, on average two experts per token,
  # the compute of top-2. The factor is shared with the decoder, whose top-2
  # capacity is then ceil(2 * 2.0 * S / E).
  e.train_capacity_factor = 2.0
  e.eval_capacity_factor = 2.0
  e.group_size = 4096
  e.aux_loss_coef = 0.01  # decoder only: expert choice is balanced by construction
  e.z_loss_coef = 0.0
  e.router_jitter = 0.0  # T5X has no jitter
  return config_base.apply_preset(c, arg)
