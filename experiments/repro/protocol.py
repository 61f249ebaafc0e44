"""The reproduction protocol: a small decoder-only Switch LM that trains here.

`scripts/reproduce.py` trains every finding's cells from this config (see
docs/results.md for the pilot that chose it). Decoder-only language
modelling on the bundled corpus, so every token is a target; a 2,048-piece
vocabulary (the bundled 8,000-piece one spends half the FLOPs on logits);
d_model 64, 4 layers, d_ff 256, Switch top-1 with 8 experts in every other
FFN (d_model 128 trains 2.8x slower and puts the reproduction past 3 hours
here: docs/results/pilot.md, round 4); AdamW with a cosine schedule that anneals to zero within the run;
float32; eval on the whole validation split (the same tokens for every
cell and every seed).

Presets:
  ""/"switch"  Switch top-1, 8 experts (the headline cell)
  "dense"      the FLOP-matched dense model (num_experts = 0)
  "encdec"     the same sizes as a span-corruption encoder-decoder (2 + 2
               layers, 128 inputs / 32 targets): finding (e) needs an encoder
"""
from switchjax import config_base

VOCAB_2K = "sentencepiece_2k.model"  # bundled, scripts/train_vocab.py --vocab_size 2048


def get_config(arg=None):
  preset = arg or "switch"
  if preset not in ("switch", "dense", "encdec"):
    raise ValueError(f"Unknown preset {preset!r}; expected switch, dense or "
                     "encdec.")
  c = config_base.base_config()
  m, e, d, t = c.model, c.moe, c.data, c.train
  m.arch = "decoder_only"
  m.vocab_size = 2176  # 2048 pieces + 100 sentinels, padded to 128
  m.d_model, m.num_heads, m.head_dim, m.d_ff = 64, 4, 16, 256
  m.num_encoder_layers = m.num_decoder_layers = 4
  m.activation = "gated_gelu"
  m.dropout_rate = 0.0  # under one epoch: nothing to regularise
  m.dtype = "float32"
  m.init_scale = 0.1  # Switch §2.4
  e.num_experts = 0 if preset == "dense" else 8
  e.sparse_every = 2
  e.router = "switch"
  e.num_selected = 1
  # One group per step (16 x 128 tokens) and a factor of 2.0 keep the
  # dropped fraction under 1 % after the first few hundred steps.
  e.group_size = 2048
  e.train_capacity_factor = e.eval_capacity_factor = 2.0
  e.router_jitter = 0.01
  d.vocab_path = VOCAB_2K
  d.seq_length = 128
  t.batch_size = 16
  t.num_steps = 600  # 1.2M tokens, ~4 minutes a run here (see docs/results.md)
  t.optimizer = "adamw"
  t.schedule = "cosine"
  t.learning_rate = 3e-3
  t.warmup_steps = 60
  t.adam_b2 = 0.99
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  t.log_every = 50
  t.eval_every = 150
  t.eval_steps = 0  # 0 = the whole validation split
  t.checkpoint_every = 200
  t.max_to_keep = 1
  if preset == "encdec":
    m.arch = "encoder_decoder"
    m.num_encoder_layers = m.num_decoder_layers = 2
    d.inputs_length, d.targets_length = 128, 32
    e.group_size = 512  # divides 16 x 32 decoder tokens
  return c
