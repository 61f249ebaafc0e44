r"""Hugging Face checkpoints in and out of switchjax workdirs.

  python -m switchjax.convert from-hf --path HF_DIR --workdir WD
  python -m switchjax.convert to-hf --workdir WD --path OUT_DIR \
      [--step N] [--expert_capacity N]

from-hf reads `SwitchTransformersForConditionalGeneration` or
`T5ForConditionalGeneration` (config.json + safetensors, sharded or not, or
pytorch_model.bin with torch) and writes WD/config.json (a full switchjax
config computing what the checkpoint computes: switchjax/hf_layout.py),
WD/hf_source.json (the source's config and tensor dtypes, so that to-hf
gives the same tensors back bit for bit), WD/spiece.model when the
directory has one (data.vocab_path points at it) and a weights-only
checkpoint at step 0 that every tool loads and that
`--config.train.init_from=WD` starts a run from. Params are float32 in the
state; to-hf writes each tensor back in its stored dtype (float32 for runs
that were not converted). --path may be a hub id when huggingface_hub is
installed and the network allows.

Refusals are one line `error: ...`, exit 1, and nothing is written: WD and
OUT_DIR must not exist yet (or be empty), and are filled under a temporary
name first.
"""
import sys

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_string("path", None, "The Hugging Face directory (from-hf: read; "
                    "to-hf: written).")
flags.DEFINE_string("workdir", None, "The switchjax workdir (from-hf: "
                    "written; to-hf: read).")
flags.DEFINE_integer("step", None, "to-hf: the checkpoint step (default: the "
                     "newest).")
flags.DEFINE_integer("expert_capacity", 0, "to-hf: export an MoE that routed "
                     "with capacity factors with this fixed per-sequence "
                     "capacity (Hugging Face's only kind).")
FLAGS = flags.FLAGS

COMMANDS = ("from-hf", "to-hf")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    sys.exit(f"error: give one command, {' or '.join(COMMANDS)} (got "
             f"{' '.join(argv[1:]) or 'none'})")
  if not FLAGS.path or not FLAGS.workdir:
    sys.exit("error: --path and --workdir are both required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  # Imported here so that usage errors answer without loading JAX.
  from switchjax import hf_convert  # pylint: disable=g-import-not-at-top
  try:
    if argv[1] == "from-hf":
      line = hf_convert.from_hf(FLAGS.path, FLAGS.workdir)
    else:
      line = hf_convert.to_hf(FLAGS.workdir, FLAGS.path, FLAGS.step,
                              FLAGS.expert_capacity)
  except hf_convert.ERRORS as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(line)


if __name__ == "__main__":
  app.run(main)
