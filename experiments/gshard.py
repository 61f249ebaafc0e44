"""GShard MoE(2048E, 36L), the 600B model (Lepikhin et al. 2020, Table 1, Appendix A.2).

"36L" counts encoder + decoder layers (§4.4: the 12L baseline "consists of 6
encoder and 6 decoder layers"), so 18 + 18 layers; MoE in every other layer
gives 18 MoE layers x 2048 experts = 36864 experts (Table 1) of 2 x 1024 x
8192 weights: 618B, ~619B with the dense rest (paper: 600B).
Top-2 gating with the random second-expert policy (Algorithm 1).
"""
from switchjax import config_base


def get_config(arg=None):
  c = config_base.base_config()
  m, e, d, t = c.model, c.moe, c.data, c.train
  # A.2: d_model 1024, FFN and expert hidden 8192, 16 heads of d_kv 128;
  # standard Transformer FFN (ReLU).
  m.d_model, m.d_ff, m.head_dim, m.num_heads = 1024, 8192, 128, 16
  m.num_encoder_layers = m.num_decoder_layers = 18
  m.activation = "relu"
  # A.2: multilingual SentencePiece of 64000 on the source side (32000 on
  # the target side); one shared vocabulary here, so the larger one.
  m.vocab_size = 64000
  m.dropout_rate = 0.1  # A.2: input, residual and attention dropout
  m.dtype = "float32"  # §4.3: float32 weights and activations for stability
  m.init_scale = 1.0  # Switch's 0.1 init came later
  e.num_experts = 2048
  e.sparse_every = 2  # §4.3: MoE "once in every other Transformer layer"
  e.router = "gshard"
  e.num_selected = 2
  e.second_expert_policy = "random"
  # §2.2: capacity 2N/E for top-2, i.e. factor 1.0 per choice in our
  # ceil(K * cf * S / E); 2 slots per expert for 2048-token groups.
  e.train_capacity_factor = 1.0
  e.eval_capacity_factor = 1.0
  e.min_capacity = 1
  # Table 3: 4M tokens per batch on 2048 cores, one group per core: 2048 tokens.
  e.group_size = 2048
  e.aux_loss_coef = 0.01  # the paper gives no value; Mesh TF's MoE default
  e.z_loss_coef = 0.0
  e.router_jitter = 0.0
  # GShard trained translation; we pre-train with T5's span corruption.
  d.name = "c4/en:3.1.0"
  t.batch_size = 8192  # Table 3: 4M tokens = 8192 x 512 input tokens
  t.num_steps = 250_000  # Table 3: 0.72 steps/s for 4 days, ~1T tokens (§4.4)
  # A.2: Adafactor, beta1 0, decay 1 - t^-0.8, clipping 1.0, learning rate
  # 1.0 * rsqrt(max(step, 10k)) = 0.01 for 10k steps, then rsqrt decay.
  t.optimizer = "adafactor"
  t.schedule = "rsqrt"
  t.learning_rate = 0.01
  t.warmup_steps = 10_000
  return config_base.apply_preset(c, arg)
