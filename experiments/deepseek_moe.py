"""DeepSeekMoE 16B (Dai et al. 2024): fine-grained experts plus shared experts.

Shape (the paper's §5 and deepseek-ai/deepseek-moe-16b-base's config.json):
a decoder-only model, d_model 2048, 28 layers, 16 heads of dim 128, RoPE
(base 10,000), RMSNorm eps 1e-6, SwiGLU, untied head, 102,400-piece
vocabulary. Layer 0 is a dense FFN of width 10,944; every other layer is an
MoE layer of 64 routed experts of width 1,408 (a quarter of a 5,632-wide
FFN) and 2 shared experts: each token goes to the 2 shared experts and to 6
of the 64 by softmax top-6, weights not renormalised. In switchjax terms the
layer is a top-2 MoE of 16 experts of width 5,632 made fine-grained
(`moe.expert_granularity=4`: 64 experts, 8 per token) with 2 of the 8 shared
(`moe.num_shared_experts=2`): the compute of the top-2 layer.
16.4B parameters, 2.8B active per token (the paper).

Training (§5.1): 2T tokens in batches of 4,608 sequences of 4,096 tokens,
AdamW (b1 0.9, b2 0.95, weight decay 0.1), peak lr 4.2e-4 after 2,000
warmup steps, gradient clipping 1.0, expert-level balance loss 0.001.
Differences, stated: the paper decays the learning rate in two steps (x0.316
at 80 % and at 90 % of training); switchjax has no step schedule and uses a
cosine one here. Its balance loss is Switch's (f_e over all K choices) on
the routed experts, which is the paper's expert-level loss up to the
constant factor N'/K' it scales f_e by.

Presets: "full" (default) and "tiny" (config_base.tiny_overrides: d_model
128, 2 layers of which the first stays dense, 8 experts made 32 of width 64
(granularity 4; moe.d_ff 256), 8 per token of which 2 shared).
"""
from switchjax import config_base


def get_config(arg=None):
  preset = arg or "full"
  c = config_base.base_config()
  m, e, d, t = c.model, c.moe, c.data, c.train
  m.arch = "decoder_only"
  m.vocab_size = 102400
  m.d_model, m.num_heads, m.head_dim = 2048, 16, 128
  m.d_ff = 10944  # the dense first layer
  m.num_decoder_layers = 28
  m.num_encoder_layers = 0
  m.activation = "swiglu"
  m.position_embedding = "rope"
  m.rope_theta = 10000.0
  m.norm_epsilon = 1e-6
  m.tie_embeddings = False
  m.dropout_rate = 0.0
  m.dtype = "bfloat16"
  m.remat = "full"
  e.num_experts = 16
  e.num_selected = 2
  e.d_ff = 5632  # before granularity: 4 x 1408
  e.expert_granularity = 4
  e.num_shared_experts = 2
  e.first_dense_layers = 1
  e.sparse_every = 1
  e.router = "topk"
  e.normalize_weights = False
  e.aux_loss_coef = 0.001
  e.z_loss_coef = 0.0
  e.router_jitter = 0.0
  e.router_dtype = "float32"
  e.train_capacity_factor = e.eval_capacity_factor = 2.0
  d.seq_length = 4096
  t.batch_size = 4608
  t.optimizer = "adamw"
  t.adam_b2 = 0.95
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  t.learning_rate = 4.2e-4
  t.schedule = "cosine"
  t.warmup_steps = 2000
  t.num_steps = 106_000  # 2T tokens at 18.9M a step
  c = config_base.apply_preset(c, preset)
  if preset == "tiny":
    m.num_encoder_layers = 0
    e.num_experts = 8
    e.d_ff = 256
    t.learning_rate = 3e-3
  return c
