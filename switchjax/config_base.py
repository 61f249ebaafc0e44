"""The one config schema every experiment file starts from.

Experiment files (experiments/*.py) call `base_config()` and change what their
paper changes; every key a user can override on the command line exists here,
so a typo in `--config.moe.num_experst=8` fails loudly (ml_collections refuses
unknown keys).
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # T5.1.1-style Transformer.
  c.model = m = ml_collections.ConfigDict()
  m.arch = "encoder_decoder"  # or "decoder_only"
  m.vocab_size = 32128  # replaced by the vocabulary's size when smaller
  m.d_model = 768
  m.num_heads = 12
  m.head_dim = 64  # T5's d_kv
  m.d_ff = 2048
  m.num_encoder_layers = 12
  m.num_decoder_layers = 12  # also the layer count of decoder_only
  m.activation = "gated_gelu"  # "relu" (T5, Switch paper), "gated_gelu" (T5.1.1), "swiglu" (Mixtral)
  m.dropout_rate = 0.1
  m.tie_embeddings = False  # T5.1.1 unties input embedding and output logits
  # The encoder has an input embedding of its own (transformers 5's Switch
  # with tie_word_embeddings=False); False: one for both stacks, as T5.
  m.separate_encoder_embedding = False
  # Positions: T5's learned relative bias ("relative", the two keys below)
  # or rotary embeddings ("rope": Llama, Mistral, Mixtral) with base rope_theta.
  m.position_embedding = "relative"
  m.relative_attention_num_buckets = 32
  m.relative_attention_max_distance = 128
  m.rope_theta = 10000.0
  m.num_kv_heads = 0  # key/value heads; 0 = num_heads, fewer = grouped-query attention
  m.attention_window = 0  # sliding-window attention over this many positions; 0 = all
  m.norm_epsilon = 1e-6  # RMSNorm's (T5 1e-6, Mixtral 1e-5)
  m.dtype = "bfloat16"  # activations / matmuls; params are always float32
  m.init_scale = 1.0  # Switch §2.4 uses 0.1 for every weight
  m.remat = "none"  # "none" | "full" | "experts": jax.checkpoint policy per block

  # Sparse layers. num_experts = 0 is the dense model.
  c.moe = e = ml_collections.ConfigDict()
  e.num_experts = 0
  e.sparse_every = 2  # FFN of every N-th layer is an MoE (1 = every layer)
  # Which layer of each N is sparse: layer i iff i % sparse_every ==
  # sparse_offset; -1 = sparse_every - 1 (the papers': 1, 3, 5, ... for N=2).
  # Hugging Face's Switch puts it at 1 (layers 1, 5, 9 for N=4): README.
  e.sparse_offset = -1
  e.router = "switch"  # switch | gshard | expert_choice | topk | noisy_topk | soft | hash | loss_free
  e.encoder_router = ""  # "" = same as `router`; e.g. expert_choice in the encoder
  e.decoder_router = ""
  e.num_selected = 1  # K for topk / noisy_topk (switch: 1, gshard: 2)
  e.train_capacity_factor = 1.25
  e.eval_capacity_factor = 2.0
  e.min_capacity = 4
  e.group_size = 1024  # tokens per routing group (S); 0 = one group per sequence (HF)
  # Slots per expert and group; 0 = from the capacity factor (the papers').
  # > 0 fixes them in training and eval, as HF's `expert_capacity`.
  e.expert_capacity = 0
  e.aux_loss_coef = 0.01
  e.z_loss_coef = 0.0
  e.router_jitter = 0.0  # multiplicative U(1-eps, 1+eps) on router inputs, training only
  e.router_dtype = "float32"  # "bfloat16" only to reproduce the instability ablation
  e.router_init_std = 0.02
  e.second_expert_policy = "all"  # gshard: "all" | "random"
  e.normalize_weights = True  # topk: renormalise the K weights to sum to 1
  # router "soft" (Soft MoE, encoders): slots per expert and group, and the
  # paper's l2 normalisation of inputs and Phi with a learned scale.
  e.slots_per_expert = 1
  e.soft_normalize = False
  e.batch_prioritized = False  # V-MoE BPR: claim slots in order of top gate
  e.expert_dropout = 0.0  # dropout inside experts (Switch: 0.4 when fine-tuning)
  e.d_ff = -1  # expert hidden dim; -1 = model.d_ff (FLOP-matched to the dense FFN)
  # DeepSeekMoE (Dai et al. 2024, switchjax/shared_experts.py): granularity m
  # splits each expert into m of width d_ff / m and chooses m x K of the
  # m x E; num_shared_experts of those m x K are always on (every token, no
  # router), so m x K - num_shared_experts are routed: equal compute.
  e.expert_granularity = 1
  e.num_shared_experts = 0
  e.first_dense_layers = 0  # the first N layers of every stack stay dense
  # router "loss_free" (switchjax/loss_free.py, DeepSeek-V3): scores, the
  # bias step after each optimizer step, and the combine weights' factor.
  e.score_func = "sigmoid"  # or "softmax"
  e.bias_update_rate = 0.001
  e.routed_scaling_factor = 1.0
  # switchjax/dispatch.py: "gather" (gather/scatter, never a [G, S, E, C]
  # tensor; "fast" is its old name, still accepted) | "einsum" (GShard's
  # one-hot reference) | "dropless" (no capacity, grouped matmuls; GPU/TPU).
  e.dispatch = "gather"
  e.expert_impl = "auto"  # expert matmuls: "batched" einsum | "loop" over experts | "auto" (loop on CPU)
  e.expert_parallel = "gspmd"  # "gspmd" | "shard_map"

  # Device mesh ('data', 'expert', 'model'); -1 takes the devices left over.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.expert = 1
  c.mesh.model = 1

  # Logical axis name -> mesh axes ("data,expert"; "" = replicated). Params
  # and key activations carry logical names; these rules place them on the
  # mesh (switchjax/partitioning.py), t5x's MoE rules by default.
  c.partitioning = ml_collections.ConfigDict()
  c.partitioning.rules = r = ml_collections.ConfigDict()
  r.batch = "data,expert"  # tokens: split over data and expert together
  r.length = ""
  r.embed = ""
  r.vocab = "model"
  r.mlp = "model"
  r.heads = "model"
  r.kv = ""
  r.relpos_buckets = ""
  r.expert = "expert"  # expert weights' leading axis
  r.expert_mlp = "model"  # expert hidden dim H
  r.unmodeled = ""  # small weights kept whole (the router's [M, E] kernel)

  c.data = d = ml_collections.ConfigDict()
  d.name = "bundled"  # the bundled corpus, or a tfds name such as "c4/en:3.1.0"
  d.data_dir = ""  # tfds data_dir; "" = tfds default (~/tensorflow_datasets)
  # "" = the bundled SentencePiece model (8000 pieces); a bare file name in
  # switchjax/data/vocab/ ("sentencepiece_2k.model") = that bundled model;
  # else a path, e.g. T5's .../cc_all.32000/sentencepiece.model.
  d.vocab_path = ""
  d.inputs_length = 512  # encoder length (span corruption inputs)
  d.targets_length = 114  # decoder length; 114 targets for 512 inputs at 15% noise
  d.noise_density = 0.15
  d.mean_noise_span_length = 3.0
  d.seq_length = 512  # decoder_only sequence length
  d.shuffle_seed = 0
  # A text-to-text task (e.g. "kjv_books"): each eval also decodes the first
  # N validation examples and reports their exact match (0 = not).
  d.exact_match_examples = 512
  # A task's training split cut to its first N examples (a small task, as
  # the fine-tuning sets Switch §4 overfits); 0 = the whole split.
  d.train_examples = 0

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 524288  # 2^19, T5's pre-training (Switch's 550k: switch_pretraining)
  t.batch_size = 256  # global, in sequences
  t.optimizer = "adafactor"  # "adafactor" | "adamw"
  t.adafactor_decay_rate = 0.8  # second-moment decay 1 - t^-0.8 (T5X default)
  t.adafactor_momentum = 0.0  # Adafactor beta1; 0 = no first moment (T5, Switch)
  t.adam_b1 = 0.9  # adamw only
  t.adam_b2 = 0.999
  t.adam_eps = 1e-8
  t.learning_rate = 0.01  # rsqrt: lr = learning_rate * rsqrt(max(step, warmup)) * sqrt(warmup)
  t.schedule = "rsqrt"  # rsqrt | constant | cosine
  t.warmup_steps = 10000
  t.weight_decay = 0.0
  t.grad_clip = 0.0  # global-norm clipping; 0 = off
  t.label_smoothing = 0.0
  t.logits_z_loss = 1e-4  # T5's output-logit z-loss (not the router's)
  t.log_every = 100
  t.eval_every = 1000
  t.eval_steps = 20  # batches per eval; 0 = the whole validation split
  t.checkpoint_every = 1000
  t.max_to_keep = 3
  t.nan_policy = "stop"  # "stop" | "skip"
  # Start a new run (step 0, fresh optimizer) from these weights: a
  # switchjax workdir (its newest checkpoint) or a Hugging Face directory.
  t.init_from = ""
  # Sparse upcycling (Komatsuzaki et al. 2022): build this MoE from a trained
  # dense workdir, every expert a copy of its layer's dense FFN.
  t.upcycle_from = ""
  # Parameters that do not train (switchjax/freeze.py): "experts", "router",
  # "moe" (both), "non_experts" (all but both) or a regular expression over
  # parameter paths; "" trains everything.
  t.freeze = ""
  # Distillation (switchjax/distill.py): a teacher workdir, the weight of its
  # soft targets (Switch: 0.25), and whether the student starts from its
  # non-expert weights.
  t.distill_from = ""
  t.distill_alpha = 0.25
  t.distill_init = False
  return c


PRESETS = ("full", "tiny")

# The bundled SentencePiece model has 8000 pieces; with T5's 100 sentinels that
# is 8100 ids, padded to a multiple of 128.
BUNDLED_VOCAB_SIZE = 8192


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (a workdir's config.json), with the keys added since it
  was written at their `base_config` defaults (which keep the old behaviour)."""
  def merge(default: dict, got: dict) -> dict:
    out = dict(got)
    for k, v in default.items():
      if k not in out:
        out[k] = v
      elif isinstance(v, dict) and isinstance(out[k], dict):
        out[k] = merge(v, out[k])
    return out
  return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


def tiny_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a paper config in place to train in minutes on a 2-core CPU.

  Keeps the structure (arch, activation, router, K, capacity factors, loss
  coefficients, sparse_every, dropout): d_model 128, <= 8 experts, enough
  layers per stack for one sparse layer, inputs 128 / targets 32, batch 16,
  float32, the bundled corpus and vocabulary, 300 steps.
  """
  m, e, d, t = c.model, c.moe, c.data, c.train
  layers = max(2, e.sparse_every) if e.num_experts > 0 else 2
  m.vocab_size = BUNDLED_VOCAB_SIZE
  m.d_model = 128
  m.num_heads = 4
  m.head_dim = 32
  m.d_ff = 256
  m.num_encoder_layers = layers
  m.num_decoder_layers = layers
  m.dtype = "float32"
  m.remat = "none"
  e.num_experts = min(e.num_experts, 8)
  e.d_ff = -1
  e.group_size = 256  # divides both 16 * 128 encoder and 16 * 32 decoder tokens
  c.mesh.data, c.mesh.expert, c.mesh.model = -1, 1, 1
  d.name = "bundled"
  d.data_dir = ""
  d.vocab_path = ""
  d.inputs_length = 128
  d.targets_length = 32
  d.seq_length = 128
  t.batch_size = 16
  t.num_steps = 300
  t.learning_rate = 0.01
  t.warmup_steps = 50
  t.log_every = 10
  t.eval_every = 100
  t.eval_steps = 5
  t.checkpoint_every = 100
  return c


def apply_preset(c: ml_collections.ConfigDict,
                 preset: str | None) -> ml_collections.ConfigDict:
  """`full` (None or "" too) returns `c` as is; `tiny` applies tiny_overrides."""
  preset = preset or "full"
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; expected one of {PRESETS}.")
  return tiny_overrides(c) if preset == "tiny" else c


def switch_pretraining(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fedus et al. 2021's pre-training protocol, shared by Switch and its T5 baselines.

  C4 span corruption, 512 inputs / 114 targets (15% noise, mean span 3; T5
  §3.3.4); 2^20 tokens per batch (2048 x 512 inputs) for 550k steps (Switch
  footnote 10); Adafactor with T5's rsqrt schedule, 0.01 for 10k steps (T5
  §3.1.2); dropout 0.1 (T5's; Switch Table 4 keeps it outside the experts);
  weights drawn with scale s = 0.1 (§2.4);
  bfloat16 with a float32 router ("selective precision", §2.4, Table 2);
  top-1 routing with aux 0.01 (§2.2), capacity factor 1.25 (Table 1) / 2.0
  at eval, multiplicative input jitter on the router (appendix "Encouraging
  Exploration Across Experts") of 1e-2, Mesh TF MoE1D's `rand_1_jitter`.
  """
  m, e, d, t = c.model, c.moe, c.data, c.train
  m.vocab_size = 32128  # T5's 32k SentencePiece + 100 sentinels, padded to 128
  m.dtype = "bfloat16"
  m.dropout_rate = 0.1
  m.init_scale = 0.1
  e.router = "switch"
  e.num_selected = 1
  e.train_capacity_factor = 1.25
  e.eval_capacity_factor = 2.0
  e.aux_loss_coef = 0.01
  e.z_loss_coef = 0.0
  e.router_jitter = 0.01
  e.router_dtype = "float32"
  e.expert_dropout = 0.0  # 0.4 only when fine-tuning (Table 4)
  d.name = "c4/en:3.1.0"
  d.inputs_length = 512
  d.targets_length = 114
  d.noise_density = 0.15
  d.mean_noise_span_length = 3.0
  t.batch_size = 2048
  t.num_steps = 550_000
  t.optimizer = "adafactor"
  t.schedule = "rsqrt"
  t.learning_rate = 0.01
  t.warmup_steps = 10_000
  return c


def config_arg(argv: list[str]) -> str:
  """The value of --config in a command line ('path[:preset]'), or '?'."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"
