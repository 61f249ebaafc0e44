"""Mixtral 8x7B (Jiang et al. 2024): a decoder-only sparse MoE of Mistral blocks.

Shape (the released config.json of mistralai/Mixtral-8x7B-v0.1 and the
paper's Table 1): d_model 4096, 32 layers, 32 query heads of dim 128 sharing
8 key/value heads (grouped-query attention), SwiGLU experts of width 14336,
8 experts in every layer with top-2 routing whose two weights are
renormalised to sum to 1 (`moe.router='topk'`), RMSNorm eps 1e-5, rotary
positions with base 1e6, untied input and output embeddings, a 32,000-piece
vocabulary, no biases. 46.7B parameters, 12.9B active per token (the paper);
`python -m switchjax.plan --config experiments/mixtral.py` logs the counts.

Differences and choices, stated:
- Attention window: Mistral 7B attends over a 4,096-token sliding window;
  Mixtral's released config has none (`sliding_window: null`) and a 32k
  context, so `model.attention_window` stays 0 here.
- Capacity: Mixtral routes without one. `full` is dropless
  (`moe.dispatch='dropless'`, grouped matmuls on GPU/TPU); `tiny` routes
  with capacity factor 2.0 through the gather dispatch, because on CPU
  dropless computes every token against every expert (switchjax/dropless.py).
- Training: Mistral published no pre-training hyperparameters. The optimizer
  and schedule below are Llama 2's published recipe (AdamW b1 0.9, b2 0.95,
  weight decay 0.1, clip 1.0, peak lr 3e-4, 2,000 warmup steps, cosine) as a
  stand-in; the load-balancing coefficient is transformers' MixtralConfig
  default (0.001), no z-loss, no router jitter.

Presets: "full" (default) and "tiny" (config_base.tiny_overrides: d_model
128, 2 layers, here 4 query / 2 key-value heads; trains here in minutes).
"""
from switchjax import config_base

MISTRAL_VOCAB_SIZE = 32000


def get_config(arg=None):
  preset = arg or "full"
  c = config_base.base_config()
  m, e, d, t = c.model, c.moe, c.data, c.train
  m.arch = "decoder_only"
  m.vocab_size = MISTRAL_VOCAB_SIZE
  m.d_model, m.num_heads, m.head_dim, m.d_ff = 4096, 32, 128, 14336
  m.num_kv_heads = 8
  m.num_decoder_layers = 32
  m.num_encoder_layers = 0
  m.activation = "swiglu"
  m.position_embedding = "rope"
  m.rope_theta = 1e6
  m.norm_epsilon = 1e-5
  m.tie_embeddings = False
  m.dropout_rate = 0.0
  m.dtype = "bfloat16"
  m.remat = "full"  # activations of 4M-token batches fit no device otherwise
  e.num_experts = 8
  e.sparse_every = 1
  e.router = "topk"
  e.num_selected = 2
  e.normalize_weights = True
  e.dispatch = "dropless"
  # Used only where a capacity applies (tiny's gather dispatch).
  e.train_capacity_factor = e.eval_capacity_factor = 2.0
  e.aux_loss_coef = 0.001
  e.z_loss_coef = 0.0
  e.router_jitter = 0.0
  e.router_dtype = "float32"
  d.seq_length = 4096
  t.batch_size = 1024  # 4M tokens a step, as Llama 2
  t.optimizer = "adamw"
  t.adam_b2 = 0.95
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  t.learning_rate = 3e-4
  t.schedule = "cosine"
  t.warmup_steps = 2000
  t.num_steps = 500_000  # 2T tokens at 4M a step
  c = config_base.apply_preset(c, preset)
  if preset == "tiny":
    m.num_kv_heads = 2  # of tiny's 4 query heads: still grouped
    m.num_encoder_layers = 0
    e.dispatch = "gather"
    t.learning_rate = 3e-3
  return c
