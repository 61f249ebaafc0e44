"""Small random Hugging Face T5 / Switch checkpoints and transformers' outputs.

Shared by tests/test_hf_convert.py and scripts/make_hf_reference.py, which
writes tests/data/hf_reference/<case>/ (the checkpoint, inputs.npz and
transformers' outputs in expected.npz) so that the converter is tested
against transformers also where torch is not installed. Building and
running the models needs torch and transformers (the `hf-test` extra).
"""
from __future__ import annotations

import os

import numpy as np

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "data", "hf_reference")
VOCAB = 128
SMALL = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_heads=4,
             relative_attention_num_buckets=8,
             relative_attention_max_distance=16, dropout_rate=0.0)
# name -> (class, config kwargs, dtype the checkpoint is saved in).
CASES = {
    # Tied head, layer 1 of 2 sparse, 2 slots for 11 tokens: drops.
    "switch_tied_drops": ("switch", dict(
        num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, num_experts=4, expert_capacity=2,
        tie_word_embeddings=True), "float32"),
    # Untied head, every layer sparse, room for every token.
    "switch_untied_every_layer": ("switch", dict(
        num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2, num_experts=4, expert_capacity=16,
        tie_word_embeddings=False), "float32"),
    # HF's i % 4 == 1 layout (moe.sparse_offset 1), 8 experts, some drops.
    "switch_step4": ("switch", dict(
        num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, num_experts=8, expert_capacity=3,
        tie_word_embeddings=True), "float32"),
    # Stored in bfloat16: params float32 in switchjax, bfloat16 back out.
    "switch_bf16": ("switch", dict(
        num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, num_experts=4, expert_capacity=2,
        tie_word_embeddings=False), "bfloat16"),
    "t5_v1_relu": ("t5", dict(num_layers=2, num_decoder_layers=2,
                              feed_forward_proj="relu",
                              tie_word_embeddings=True), "float32"),
    "t5_v1_1_gated": ("t5", dict(num_layers=2, num_decoder_layers=3,
                                 feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False), "float32"),
}


def inputs(seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of 3 rows: 11 encoder ids (no padding), 7 decoder ids."""
  rs = np.random.RandomState(seed)
  enc = rs.randint(2, VOCAB, size=(3, 11)).astype(np.int32)
  tgt = rs.randint(2, VOCAB, size=(3, 7)).astype(np.int32)
  dec = np.concatenate([np.zeros((3, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
          "decoder_target_tokens": tgt}


def build(case: str, path: str, seed: int = 0, **overrides) -> None:
  """Saves a random model of `case` (save_pretrained, as a user would);
  `overrides` change its config (e.g. vocab_size)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  kind, kwargs, dtype = CASES[case]
  kwargs = {**SMALL, **kwargs, **overrides}
  torch.manual_seed(seed)
  if kind == "switch":
    config = transformers.SwitchTransformersConfig(**kwargs)
    model = transformers.SwitchTransformersForConditionalGeneration(config)
  else:
    config = transformers.T5Config(**kwargs)
    model = transformers.T5ForConditionalGeneration(config)
  with torch.no_grad():  # norms start at 1: make them matter
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.uniform_(0.5, 1.5)
  model.to(getattr(torch, dtype)).save_pretrained(path)


def hf_outputs(path: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers' logits and, per sparse layer, each token's expert and
  whether it was dropped, by HF's own rule (per-sequence cumsum of the
  argmax one-hots over expert_capacity), computed in float32."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
      path, dtype=torch.float32).eval()
  switch = model.config.model_type == "switch_transformers"
  with torch.no_grad():
    out = model(input_ids=torch.tensor(batch["encoder_input_tokens"]).long(),
                decoder_input_ids=torch.tensor(
                    batch["decoder_input_tokens"]).long(),
                **({"output_router_logits": True} if switch else {}))
  result = {"logits": out.logits.float().numpy()}
  if not switch:
    return result
  capacity = model.config.expert_capacity
  for stack, logits in (("encoder", out.encoder_router_logits),
                        ("decoder", out.decoder_router_logits)):
    layers = [i for i, block in enumerate(getattr(model, stack).block)
              if block.is_sparse]
    for layer, lg in zip(layers, logits):
      expert = torch.argmax(torch.softmax(lg.float(), -1), -1)
      onehot = torch.nn.functional.one_hot(expert, lg.shape[-1])
      priority = (torch.cumsum(onehot, dim=1) * onehot).sum(-1)
      result[f"{stack}/layer_{layer}/expert"] = expert.numpy()
      result[f"{stack}/layer_{layer}/dropped"] = (priority > capacity).numpy()
  return result
