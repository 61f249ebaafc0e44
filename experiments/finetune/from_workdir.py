r"""A workdir's own config, starting from its weights: fine-tune a converted
Hugging Face checkpoint (or any run) with the model it was saved with.

  python -m switchjax.convert from-hf --path switch-base-8 --workdir runs/switch-base-8
  python -m switchjax.main --config experiments/finetune/from_workdir.py:runs/switch-base-8 \
      --workdir runs/switch-base-8-ft --config.train.num_steps=1000 ...

The argument is the workdir: its config.json, with `train.init_from` set to
it, so the new run starts at step 0 from its newest checkpoint's params
(README, "Starting from weights"). Override training keys as for any
experiment; a converted checkpoint's config keeps its own data and
optimizer defaults (config_base's), which you will want to set.
"""
import json
import os

import ml_collections


def get_config(arg=None):
  if not arg:
    raise ValueError("experiments/finetune/from_workdir.py needs the workdir: "
                     "--config experiments/finetune/from_workdir.py:WD")
  path = os.path.join(arg, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist: {arg} is not a switchjax "
                     "workdir")
  with open(path) as f:
    c = ml_collections.ConfigDict(json.load(f))
  c.train.init_from = arg
  return c
