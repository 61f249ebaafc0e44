"""Prints the README's table of released Hugging Face Switch and T5 checkpoints.

  python scripts/hf_checkpoints.py

Each row is the config.json the checkpoint's shapes imply (T5X's
switch_classic_*.gin for Switch, the T5 and T5.1.1 releases for T5), mapped
by switchjax.hf_layout.config_from_hf, with the parameter counts of
switchjax.model.param_counts (abstract shapes: nothing is downloaded). The
downloaded config.json is what from-hf reads; these rows are for planning.
"""
from switchjax import hf_layout
from switchjax import model as model_lib

SWITCH = dict(architectures=[hf_layout.SWITCH], vocab_size=32128,
              expert_capacity=64, dense_act_fn="relu")
T5 = dict(architectures=[hf_layout.T5], vocab_size=32128)


def _switch(d, ff, heads, layers, sparse, experts, tied, act="relu"):
  return dict(SWITCH, d_model=d, d_ff=ff, d_kv=64, num_heads=heads,
              num_layers=layers, num_decoder_layers=layers,
              num_sparse_encoder_layers=sparse,
              num_sparse_decoder_layers=sparse, num_experts=experts,
              tie_word_embeddings=tied, dense_act_fn=act)


def _t5(d, ff, kv, heads, layers, v11):
  return dict(T5, d_model=d, d_ff=ff, d_kv=kv, num_heads=heads,
              num_layers=layers, num_decoder_layers=layers,
              feed_forward_proj="gated-gelu" if v11 else "relu",
              tie_word_embeddings=not v11)


CHECKPOINTS = {
    **{f"google/switch-base-{e}": _switch(768, 3072, 12, 12, 6, e, True)
       for e in (8, 16, 32, 64, 128, 256)},
    "google/switch-large-128": _switch(1024, 4096, 16, 24, 12, 128, True),
    # GEGLU experts (switch_classic_xxl.gin): HF's Switch class has none.
    "google/switch-xxl-128": _switch(4096, 10240, 64, 24, 12, 128, False,
                                     act="gated-gelu"),
    "google/switch-c-2048": _switch(2080, 6144, 30, 15, 15, 2048, False),
    "t5-small": _t5(512, 2048, 64, 8, 6, False),
    "t5-base": _t5(768, 3072, 64, 12, 12, False),
    "t5-large": _t5(1024, 4096, 64, 16, 24, False),
    "t5-3b": _t5(1024, 16384, 128, 32, 24, False),
    "t5-11b": _t5(1024, 65536, 128, 128, 24, False),
    "google/t5-v1_1-small": _t5(512, 1024, 64, 6, 8, True),
    "google/t5-v1_1-base": _t5(768, 2048, 64, 12, 12, True),
    "google/t5-v1_1-large": _t5(1024, 2816, 64, 16, 24, True),
    "google/t5-v1_1-xl": _t5(2048, 5120, 64, 32, 24, True),
    "google/t5-v1_1-xxl": _t5(4096, 10240, 64, 64, 24, True),
}


def _count(n: int) -> str:
  return f"{n / 1e12:.2f}T" if n >= 1e12 else (
      f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M")


def main() -> None:
  print("| checkpoint | switchjax config | params (total / active per token) |")
  print("|---|---|---|")
  for name, hf in CHECKPOINTS.items():
    try:
      c = hf_layout.config_from_hf(hf)
    except hf_layout.LayoutError as e:
      print(f"| {name} | refused: {e} | |")
      continue
    m, e = c.model, c.moe
    desc = (f"d_model {m.d_model}, {m.activation} d_ff {m.d_ff}, "
            f"{m.num_heads} heads, {m.num_encoder_layers}+"
            f"{m.num_decoder_layers} layers, "
            f"{'tied' if m.tie_embeddings else 'untied'} head")
    if e.num_experts:
      desc += (f"; {e.num_experts} experts, sparse_every {e.sparse_every}, "
               f"expert_capacity {e.expert_capacity}, group_size 0")
    total, active = model_lib.param_counts(c)
    print(f"| {name} | {desc} | {_count(total)} / {_count(active)} |")


if __name__ == "__main__":
  main()
