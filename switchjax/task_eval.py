r"""Scores a workdir's checkpoint on a text-to-text task by exact match.

  python -m switchjax.task_eval --workdir WD [--split test] [--examples N]
      [--step N] [--data_name kjv_books]

Greedy decode of each example's inputs against its targets
(`switchjax.exact_match`), on any split; --data_name scores a run on a task
it was not trained on (e.g. a pre-trained run before fine-tuning).
"""
from __future__ import annotations

import sys

from switchjax import exact_match as exact_match_lib
from switchjax.data import pipeline


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
    if not pipeline.is_task_data(config):
      raise ValueError(f"data {config.data.name!r} is not a text-to-text task "
                       "(examples with inputs and targets); pass --data_name")
    result = exact_match_lib.exact_match(model, config, f.split, f.examples)
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
