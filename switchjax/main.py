r"""Trains a switchjax experiment.

  python -m switchjax.main --config experiments/switch_base.py:tiny \
      --workdir runs/switch_base_tiny [--config.moe.num_experts=16 ...]

Run it again with the same --workdir to resume from the newest checkpoint.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/switch_base.py:tiny.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Where metrics and checkpoints go.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume although the learning-rate schedule or other safe "
                  "keys (see README) differ from the run in --workdir.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  # Imported here so --help answers without loading JAX.
  from switchjax import train  # pylint: disable=g-import-not-at-top
  from switchjax import validate  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                             allow_config_change=FLAGS.allow_config_change)
  except validate.ConfigError as e:
    sys.exit(f"error: {e}")
  except FloatingPointError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
