r"""Exact-match accuracy of a text-to-text task, by decoding.

  python -m switchjax.task_eval --workdir WD [--split test] [--examples N]
      [--step N] [--data_name kjv_books]

A task's example is right when the greedy decode of its inputs (read as in
training: `pipeline.task_ids`), cut at eos, is its target text exactly
(surrounding whitespace aside). Training reports this on the validation split
at every eval (`exact_match`, over the first `data.exact_match_examples`) of a
run on a task; the command scores a workdir's checkpoint on any split, e.g.
a pre-trained run on the task it was never fine-tuned on (--data_name).
"""
from __future__ import annotations

import sys
from typing import Any

from flax import nnx

from switchjax import decoding
from switchjax.data import pipeline
from switchjax.data import tfds_corpus
from switchjax.data import vocab as vocab_lib

BATCH = 64  # prompts decoded together
MAX_NEW_TOKENS = 16  # the longest kjv_books answer is 6 ids with eos


def is_task(config) -> bool:
  source = tfds_corpus.data_source(config.data.name, "validation",
                                   config.data.data_dir or None)
  return pipeline.is_task(source)


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


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from switchjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from switchjax import score  # pylint: disable=g-import-not-at-top
  from switchjax import weights  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    config, step, model = score.load_model(f.workdir, f.step)
    if f.data_name:
      config.data.name = f.data_name
    if not is_task(config):
      raise ValueError(f"data {config.data.name!r} is not a text-to-text task "
                       "(examples with inputs and targets); pass --data_name")
    result = exact_match(model, config, f.split, f.examples)
  except (ValueError, weights.WeightsError, ckpt_lib.CheckpointError) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(f"exact match {result['exact_match']:.4f} on {result['examples']} "
        f"{f.split} examples of {config.data.name} (step {step} of "
        f"{f.workdir})")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The switchjax workdir to score.")
  flags.DEFINE_string("split", "validation", "The task's split.")
  flags.DEFINE_integer("examples", 0, "The first N examples (0 = all).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_string("data_name", "", "The task (default: the run's data).")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  app.run(main)
