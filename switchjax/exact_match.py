"""Exact-match accuracy of a text-to-text task, by decoding.

A task's example is right when the greedy decode of its inputs (read as in
training: `pipeline.task_ids`), cut at eos, is its target text exactly
(surrounding whitespace aside). Training reports this on the validation split
at every eval (`exact_match`, over the first `data.exact_match_examples`) of a
run on a task; `switchjax.task_eval` scores a checkpoint on any split.
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from switchjax import decoding
from switchjax.data import pipeline
from switchjax.data import tfds_corpus
from switchjax.data import vocab as vocab_lib

BATCH = 64  # prompts decoded together
MAX_NEW_TOKENS = 16  # the longest kjv_books answer is 6 ids with eos


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def exact_match(model: nnx.Module, config, split: str = "validation",
                examples: int = 0) -> dict[str, Any]:
  """{'exact_match': fraction right, 'examples': n} over the first `examples`
  of `split` (0 = all), greedy, dropless MoE decode."""
  vocab = vocab_lib.get_vocabulary(config)
  source = tfds_corpus.data_source(config.data.name, split,
                                   config.data.data_dir or None)
  n = len(source) if examples <= 0 else min(examples, len(source))
  right = 0
  for start in range(0, n, BATCH):
    rows = [source[i] for i in range(start, min(n, start + BATCH))]
    prompts = [pipeline.task_ids(vocab, _text(r["inputs"]), config.model.arch)
               for r in rows]
    out = decoding.generate(model, prompts, eos_id=vocab.eos_id,
                            max_new_tokens=MAX_NEW_TOKENS, dropless=True)
    right += sum(vocab.decode(t).strip() == _text(r["targets"]).strip()
                 for t, r in zip(out.tokens, rows))
  return {"exact_match": right / n if n else 0.0, "examples": n}


