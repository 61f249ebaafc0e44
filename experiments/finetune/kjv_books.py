r"""Fine-tuning on the bundled task (kjv_books: verse -> book) with Switch's recipe.

  python -m switchjax.main --config experiments/switch_base.py:tiny        # pre-train
  python -m switchjax.main --config experiments/finetune/kjv_books.py:tiny    # fine-tune it
  python -m switchjax.main --config experiments/finetune/kjv_books.py:switch_large \
      --config.train.init_from=WD     # a paper model from its pre-trained run

The argument is an experiment's name (switch_base, the default; switch_large,
switch_xxl, switch_c, t5_base, t5_large, gshard, ...), optionally with
",tiny"; "tiny" alone is "switch_base,tiny". Tiny presets start from the
main job's default workdir of that experiment (runs/<name>-tiny, relative to
the current directory); the others need --config.train.init_from (without
one the model trains from scratch on the task).

The recipe (Switch §4.1, Table 4; T5 §3.1.2 for what Switch kept of T5):
dropout 0.1 everywhere but inside the experts, expert dropout 0.4 there
(Table 4's best); a constant learning rate (T5: 1e-3 with Adafactor; the
tiny presets 3e-3, measured), no warm-up; the capacity factors of pre-training (train 1.25, eval 2.0 for
Switch). Evaluation: loss on the whole validation split and exact match of
the decoded book name (data.exact_match_examples).
"""
import importlib.util
import os

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base(name: str, preset: str):
  path = os.path.join(EXPERIMENTS, f"{name}.py")
  if not os.path.isfile(path):
    raise ValueError(f"experiments/finetune/kjv_books.py: no experiment {name!r} "
                     f"(experiments/{name}.py)")
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def get_config(arg=None):
  arg = arg or "switch_base"
  name, _, preset = ("switch_base,tiny" if arg == "tiny" else arg).partition(",")
  c = _base(name, preset)
  m, e, d, t = c.model, c.moe, c.data, c.train
  m.dropout_rate = 0.1
  e.expert_dropout = 0.4
  t.schedule, t.learning_rate, t.warmup_steps = "constant", 1e-3, 0
  d.name = "kjv_books"
  d.targets_length = 8  # the longest book name is 5 ids, with eos 6
  t.eval_steps = 0  # the whole validation split
  d.exact_match_examples = 512
  if preset == "tiny":
    t.init_from = os.path.join("runs", f"{name}-tiny")
    d.inputs_length = 128
    t.batch_size = 32
    # Measured on switch_base,tiny (exact match on 512 validation verses):
    # 1e-3 for 300 steps 2.1 %; 3e-3 for 600 steps 9-10 %.
    t.learning_rate = 3e-3
    t.num_steps = 600
    t.eval_every = t.checkpoint_every = 100
  else:
    d.inputs_length = 128  # the longest verse is 90 ids with eos
    t.batch_size = 128  # T5's fine-tuning batch
    t.num_steps = 10_000
    t.eval_every = t.checkpoint_every = 1_000
    # Groups must divide the batch's 128 x 8 decoder tokens.
    if e.num_experts and e.group_size and (128 * 8) % e.group_size:
      e.group_size = 1024
  return c
