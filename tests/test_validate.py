"""config_schema.SCHEMA: every config key checked before any work, one line each.

In-process, every key of config_base.base_config() gets a wrong type, a
zero, a negative and an out-of-range value (built from the table and, apart
from it, written out by hand), the checks across keys get their cases, and
valid boundary values pass. Through the real command line, a handful of
those end in one `error:` line, exit 1, and leave the disk as it was.
"""
import json
import math
import os
import re
import subprocess
import sys
from multiprocessing.pool import ThreadPool

import conftest
from flax import traverse_util
import ml_collections
import pytest

from switchjax import config_base
from switchjax import config_schema
from switchjax import validate
from switchjax.data import span_corruption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/switch_base.py"
EXPERIMENTS = sorted(
    os.path.splitext(n)[0] for n in os.listdir(os.path.join(ROOT, "experiments"))
    if n.endswith(".py"))


def experiment(name="switch_base", preset="tiny"):
  return conftest.experiment(name, preset)


def tiny(**values):
  """Switch-Base tiny with `values` (dotted keys) set as they are: no
  ml_collections type-safety, so wrong types reach validate."""
  flat = validate.flatten(experiment())
  flat.update({k.replace("__", "."): v for k, v in values.items()})
  return ml_collections.ConfigDict(traverse_util.unflatten_dict(flat, sep="."))


def refused(config, num_devices=8) -> str:
  with pytest.raises(validate.ConfigError) as info:
    validate.prepare(config, num_devices)
  message = str(info.value)
  assert "\n" not in message
  return message


# --- The table covers the schema. ---

def test_schema_covers_exactly_the_keys_of_base_config():
  assert set(config_schema.SCHEMA) == set(validate.flatten(config_base.base_config()))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_and_preset_passes(name):
  for preset in config_base.PRESETS:
    validate.check_config(experiment(name, preset), 8)
  validate.prepare(experiment(name, "tiny"), 8)


def test_defaults_lie_inside_their_own_ranges():
  for key, value in validate.flatten(config_base.base_config()).items():
    assert config_schema.SCHEMA[key].accepts(value), key


# --- Every key: wrong types, zeros, negatives, out of range. ---

def _bad_values(spec):
  """Values outside `spec`, from the table."""
  if spec.kind == "bool":
    return [1, 0, "true", None, 1.0]
  if spec.kind in ("str", "choice"):
    bad = [1, None, True, 0.5]
    if spec.kind == "choice":
      bad += ["nope", spec.choices[0].upper()]
    if spec.nonempty:
      bad.append("")
    return bad
  bad = ["1", None, True, False, [1]]
  if spec.kind == "int":
    bad += [1.0, 1.5, 2.0**40]
  else:
    bad += [math.nan, math.inf, -math.inf]
  if spec.low is not None:
    lows = [spec.low] if spec.low_open else []
    lows += [spec.low - 1, spec.low - 0.5 if spec.kind == "float" else None]
    bad += [v for v in lows if v is not None and not config_schema._same(
        v, spec.special)]
  if spec.high is not None:
    bad += [spec.high + 1] + ([spec.high] if spec.high_open else [])
  return bad


CASES = [(key, value) for key, spec in config_schema.SCHEMA.items()
         for value in _bad_values(spec)]


def test_every_key_refuses_wrong_types_and_values():
  failures = []
  for key, value in CASES:
    try:
      validate.prepare(tiny(**{key: value}), 8)
      failures.append((key, value, "passed"))
    except validate.ConfigError as e:
      if not str(e).startswith(key) or "\n" in str(e):
        failures.append((key, value, str(e)))
  assert not failures, failures[:20]
  assert len(CASES) > 6 * len(config_schema.SCHEMA)


# Written out apart from the table: (key, bad value) with what the message
# says. The first twelve ended in tracebacks before the table existed.
HAND_WRITTEN = [
    ("model.d_model", 0, r"model\.d_model must be an int >= 1, got 0"),
    ("model.num_heads", 0, r"model\.num_heads must be an int >= 1, got 0"),
    ("model.dropout_rate", 1.5, r"dropout_rate must be a finite number in \[0, 1\)"),
    ("model.dtype", "float8", r"model\.dtype must be one of 'bfloat16', 'float32'"),
    ("moe.router_jitter", 2.0, r"router_jitter must be a finite number in \[0, 1\)"),
    ("moe.expert_dropout", 1.0, r"expert_dropout .* in \[0, 1\), got 1\.0"),
    ("moe.min_capacity", 0, r"min_capacity must be an int >= 1, got 0"),
    ("data.inputs_length", 0, r"inputs_length must be an int >= 3, got 0"),
    ("data.noise_density", 1.5, r"noise_density .* in \(0, 1\), got 1\.5"),
    ("train.learning_rate", -1.0, r"learning_rate must be a finite number > 0"),
    ("train.optimizer", "sgd", r"optimizer must be one of 'adafactor', 'adamw'"),
    ("train.learning_rate", math.nan, r"learning_rate .*, got nan"),
    # Types: bool is not an int, a float is not an int, strings are not numbers.
    ("model.d_model", True, r"d_model must be an int >= 1, got True"),
    ("model.d_model", 128.0, r"got 128\.0"),
    ("model.tie_embeddings", 1, r"tie_embeddings must be true or false, got 1"),
    ("train.learning_rate", "0.01", r"got '0\.01'"),
    ("train.learning_rate", math.inf, r"got inf"),
    ("train.learning_rate", 0.0, r"learning_rate must be a finite number > 0, got 0\.0"),
    ("moe.train_capacity_factor", 0.0, r"train_capacity_factor must be a finite number > 0"),
    ("moe.eval_capacity_factor", -1.0, r"eval_capacity_factor must be .* > 0"),
    ("moe.num_experts", -1, r"num_experts must be an int >= 0"),
    ("moe.d_ff", 0, r"moe\.d_ff must be -1 \(model\.d_ff\) or an int >= 1, got 0"),
    ("moe.d_ff", -2, r"moe\.d_ff must be -1"),
    ("moe.router", "top1", r"moe\.router must be one of 'switch', 'gshard'"),
    ("moe.encoder_router", "top1", r"encoder_router must be '' \(same as moe\.router\)"),
    ("moe.dispatch", "scatter", r"dispatch must be one of 'gather', 'einsum', "
     r"'dropless' \(or 'fast', the old name of 'gather'\)"),
    ("moe.expert_parallel", "pmap", r"expert_parallel must be one of 'gspmd', 'shard_map'"),
    ("moe.router_dtype", "float16", r"router_dtype must be one of 'float32', 'bfloat16'"),
    ("moe.second_expert_policy", "none", r"one of 'all', 'random'"),
    ("moe.expert_impl", "vmap", r"one of 'auto', 'batched', 'loop'"),
    ("model.activation", "gelu", r"one of 'relu', 'gated_gelu'"),
    ("model.arch", "encoder_only", r"arch must be one of 'encoder_decoder', 'decoder_only'"),
    ("model.remat", "some", r"remat must be one of 'none', 'full', 'experts'"),
    ("model.init_scale", 0.0, r"init_scale must be a finite number > 0"),
    ("model.relative_attention_num_buckets", 1, r"num_buckets must be an int >= 2"),
    ("mesh.data", 0, r"mesh\.data must be -1 \(the devices left over\) or an int >= 1"),
    ("mesh.model", -2, r"mesh\.model must be -1"),
    ("seed", -1, r"seed must be an int in \[0, 2\*\*32 - 3\], got -1"),
    ("seed", 2**32 - 2, r"seed must be an int in \[0, 2\*\*32 - 3\]"),
    ("data.shuffle_seed", 2**32, r"shuffle_seed must be an int in \[0, 2\*\*32 - 1\]"),
    ("model.d_ff", 2**31, r"d_ff must be an int in \[1, 2\*\*31 - 1\]"),
    ("data.name", "", r"data\.name must be a non-empty string"),
    ("data.mean_noise_span_length", 0.5, r"mean_noise_span_length must be .* >= 1"),
    ("data.noise_density", 0.0, r"noise_density must be .* in \(0, 1\)"),
    ("train.adafactor_decay_rate", 0.0, r"adafactor_decay_rate .* in \(0, 1\]"),
    ("train.adafactor_decay_rate", 1.5, r"adafactor_decay_rate .* in \(0, 1\]"),
    ("train.adafactor_momentum", 1.0, r"adafactor_momentum .* in \[0, 1\)"),
    ("train.adam_b1", 1.0, r"adam_b1 .* in \[0, 1\)"),
    ("train.adam_b2", -0.1, r"adam_b2 .* in \[0, 1\)"),
    ("train.adam_eps", 0.0, r"adam_eps must be a finite number > 0"),
    ("train.grad_clip", -1.0, r"grad_clip must be a finite number >= 0"),
    ("train.weight_decay", -0.1, r"weight_decay must be a finite number >= 0"),
    ("train.label_smoothing", 1.0, r"label_smoothing .* in \[0, 1\)"),
    ("train.logits_z_loss", -1e-4, r"logits_z_loss must be .* >= 0"),
    ("train.schedule", "linear", r"schedule must be one of 'rsqrt', 'constant', 'cosine'"),
    ("train.warmup_steps", -1, r"warmup_steps must be an int >= 0"),
    ("train.num_steps", 0, r"num_steps must be an int >= 1"),
    ("train.batch_size", 0, r"batch_size must be an int >= 1"),
    ("train.max_to_keep", 0, r"max_to_keep must be an int >= 1"),
    ("train.nan_policy", "ignore", r"nan_policy must be one of 'stop', 'skip', got 'ignore'"),
    ("partitioning.rules.mlp", None, r"rules\.mlp must be mesh axes"),
]


@pytest.mark.parametrize("key,value,message", HAND_WRITTEN,
                         ids=[f"{k}={v!r}" for k, v, _ in HAND_WRITTEN])
def test_hand_written_bad_values(key, value, message):
  assert key in config_schema.SCHEMA
  assert re.search(message, refused(tiny(**{key: value})))


def test_every_wrong_value_is_named_at_once():
  message = refused(tiny(**{"model.d_model": 0, "train.optimizer": "sgd"}))
  assert message == ("model.d_model must be an int >= 1, got 0; "
                     "train.optimizer must be one of 'adafactor', 'adamw', "
                     "got 'sgd'")


# --- Keys together. ---

DECODER_ONLY = {"model.arch": "decoder_only", "data.seq_length": 128}

CROSS = [
    ({"moe.router": "topk", "moe.num_selected": 9},
     r"^moe\.router='topk' sends each token to K=9 experts \(moe\.num_selected\)"
     r", more than moe\.num_experts=8$"),
    ({"moe.router": "gshard", "moe.num_experts": 1, "moe.decoder_router": "switch"},
     r"^moe\.router='gshard' sends each token to K=2 experts, more than "
     r"moe\.num_experts=1$"),
    ({"moe.decoder_router": "expert_choice"},
     r"^moe\.decoder_router: router 'expert_choice' \(each expert picks .* "
     r"future tokens leak in a decoder"),
    ({**DECODER_ONLY, "moe.router": "expert_choice"},
     r"^moe\.router: router 'expert_choice'"),
    ({"moe.batch_prioritized": True}, r"^moe\.batch_prioritized \(slots claimed"),
    ({"moe.encoder_router": "expert_choice", "moe.dispatch": "dropless"},
     r"^moe\.dispatch='dropless' needs token-choice routers; "
     r"moe\.encoder_router='expert_choice'"),
    ({"moe.group_size": 48},
     r"^moe\.group_size=48 does not divide the encoder's 2048 tokens"),
    ({"moe.sparse_every": 2, "moe.sparse_offset": 2},
     r"^moe\.sparse_offset=2 must be < moe\.sparse_every=2 \(or -1\)"),
    ({**DECODER_ONLY, "model.separate_encoder_embedding": True},
     r"^model\.separate_encoder_embedding=True needs an encoder"),
    ({"data.targets_length": 20, "moe.group_size": 64},
     r"^data\.targets_length=20 is too short for span corruption of "
     r"data\.inputs_length=128 .*: it needs 29$"),
    ({"data.noise_density": 0.9},
     r"^data\.noise_density=0\.9 is too high for data\.mean_noise_span_length"
     r"=3\.0: every noise span needs a non-noise token before it"),
    ({"data.noise_density": 0.99, "data.mean_noise_span_length": 1e9},
     r"too short .*: it needs about \d+$"),  # refused before the helper's loop
    ({"data.inputs_length": 4096, "data.targets_length": 1024},
     r"makes 227 noise spans, more than the vocabulary's 100 sentinels"),
    ({"train.schedule": "cosine", "train.warmup_steps": 300},
     r"^train\.schedule='cosine' needs train\.num_steps \(300\) > "
     r"train\.warmup_steps \(300\)$"),
    ({"train.warmup_steps": 0},
     r"^train\.schedule='rsqrt' needs train\.warmup_steps >= 1"),
    ({"model.num_encoder_layers": 0},
     r"^model\.num_encoder_layers must be >= 1 in an encoder_decoder"),
    ({"model.relative_attention_num_buckets": 3},
     r"^model\.relative_attention_num_buckets must be >= 4 in an encoder_decoder"),
    ({"model.relative_attention_max_distance": 16},
     r"^model\.relative_attention_max_distance must be > "
     r"model\.relative_attention_num_buckets // 2 = 16"),
    ({"mesh.data": 3}, r"needs 3 devices, but 8 are available"),
    ({"mesh.data": -1, "mesh.expert": -1}, r"at most one axis may be -1"),
    ({"mesh.data": 1, "mesh.expert": 8, "moe.num_experts": 4},
     r"moe\.num_experts=4 is not divisible by the mesh's expert axis \(8\)"),
    ({"train.batch_size": 4}, r"train\.batch_size=4 is not divisible by the 8 "
     r"batch shards"),
    ({"moe.expert_parallel": "shard_map", "moe.num_experts": 2, "mesh.data": 4,
      "mesh.expert": 2, "partitioning.rules.expert": "data,expert"},
     r"^moe\.num_experts=2 is not divisible by the 8 devices of "
     r"partitioning\.rules\.expert='data,expert' \(moe\.expert_parallel="
     r"'shard_map'\)$"),
    ({"partitioning.rules.mlp": "tensor"},
     r"partitioning\.rules\.mlp: unknown mesh axes \['tensor'\]"),
    ({"partitioning.rules.batch": "data,data"}, r"repeated mesh axis"),
    ({"partitioning.rules.bogus": "data"}, r"^unknown config keys: "
     r"partitioning\.rules\.bogus$"),
    ({"data.vocab_path": "/nonexistent/spm.model"},
     r"^data\.vocab_path: SentencePiece model not found"),
    ({"data.name": "c4/en:3.1.0", "data.data_dir": "/nonexistent/tfds"},
     r"^data\.name: tfds dataset 'c4/en:3\.1\.0' is not prepared"),
]


@pytest.mark.parametrize("values,message", CROSS,
                         ids=[",".join(f"{k}={v}" for k, v in c.items())
                              for c, _ in CROSS])
def test_keys_that_do_not_go_together(values, message):
  assert re.search(message, refused(tiny(**values)))


def test_missing_key_is_refused():
  flat = validate.flatten(experiment())
  del flat["train.nan_policy"]
  config = ml_collections.ConfigDict(traverse_util.unflatten_dict(flat, sep="."))
  assert refused(config) == (
      "missing config keys: train.nan_policy (start experiment configs from "
      "config_base.base_config())")


# Valid values at the edges of their ranges, with what they need of others.
BOUNDARIES = [
    {"seed": 0}, {"seed": 2**32 - 3}, {"data.shuffle_seed": 2**32 - 1},
    {"model.dropout_rate": 0.0}, {"model.dropout_rate": 0.999},
    {"moe.router_jitter": 0.999}, {"moe.expert_dropout": 0.0},
    {"moe.min_capacity": 1}, {"moe.train_capacity_factor": 1e-3},
    {"moe.router_init_std": 0.0}, {"moe.aux_loss_coef": 0.0},
    {"moe.d_ff": -1}, {"moe.d_ff": 1}, {"moe.dispatch": "fast"},
    {"moe.dispatch": "einsum"}, {"moe.encoder_router": ""},
    {"moe.encoder_router": "expert_choice"},  # the encoder may look ahead
    {"moe.num_experts": 0, "moe.router": "expert_choice"},  # dense: no router
    {"moe.router": "topk", "moe.num_selected": 8},  # K == E
    {"moe.group_size": 1}, {"moe.group_size": 10**6},  # min(S, tokens)
    {"moe.group_size": 0, "moe.expert_capacity": 3},  # HF: a group per row
    {"moe.sparse_every": 4, "moe.sparse_offset": 1},  # HF's layout
    {"mesh.data": 8}, {"mesh.data": 2, "mesh.expert": 4},
    {"mesh.data": 1, "mesh.model": -1},
    {"model.num_encoder_layers": 0, **DECODER_ONLY},
    {"model.relative_attention_num_buckets": 4,
     "model.relative_attention_max_distance": 3},
    {"model.relative_attention_num_buckets": 2,
     "model.relative_attention_max_distance": 2, **DECODER_ONLY},
    {"data.inputs_length": 3},
    {"data.noise_density": 0.5, "data.mean_noise_span_length": 1.0,
     "data.targets_length": 128},
    {"data.noise_density": 1e-6, "data.targets_length": 3},
    {"data.mean_noise_span_length": 1.0, "data.targets_length": 40,
     "moe.group_size": 128},
    {"train.learning_rate": 1e-30}, {"train.learning_rate": 1},
    {"train.adafactor_decay_rate": 1.0}, {"train.adam_b2": 0.0},
    {"train.label_smoothing": 0.999}, {"train.grad_clip": 0.0},
    {"train.schedule": "constant", "train.warmup_steps": 0},
    {"train.schedule": "cosine", "train.warmup_steps": 299},
    {"train.num_steps": 1, "train.log_every": 1, "train.eval_every": 1},
    {"partitioning.rules.batch": ""}, {"partitioning.rules.mlp": "model,none"},
]


@pytest.mark.parametrize("values", BOUNDARIES, ids=str)
def test_valid_boundary_values_pass(values):
  validate.prepare(tiny(**values), 8)


def test_span_corruption_settings_that_pass_fit_their_lengths():
  """What _check_span_corruption lets through, span_corruption really fits."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  passed = 0
  for inputs in (3, 5, 128):
    for density in (1e-6, 0.15, 0.5, 0.74, 0.9):
      for span in (1.0, 3.0, 64.0):
        for targets in (1, 3, 30, 200):
          config = ml_collections.ConfigDict({"data": dict(
              inputs_length=inputs, targets_length=targets,
              noise_density=density, mean_noise_span_length=span)})
          try:
            validate._check_span_corruption(config, 100)  # pylint: disable=protected-access
          except validate.ConfigError:
            continue
          passed += 1
          raw, _ = span_corruption.random_spans_helper(inputs, density, span)
          for _ in range(3):
            tokens = rng.integers(3, 1000, size=raw)
            x, y = span_corruption.span_corruption(
                tokens, rng, noise_density=density,
                mean_noise_span_length=span, first_sentinel_id=1099, eos_id=1)
            assert len(x) <= inputs and len(y) <= targets, (
                inputs, density, span, targets)
  assert passed > 20


# --- Renames and helpers. ---

def test_fast_is_gather_in_config_and_workdir(tmp_path):
  config = validate.prepare(tiny(**{"moe.dispatch": "fast"}), 8)
  assert config.moe.dispatch == "gather"
  assert validate.prepare(tiny(), 8).moe.dispatch == "gather"
  # A workdir written when the default was called 'fast' resumes as is.
  old = json.loads(config.to_json())
  old["moe"]["dispatch"] = "fast"
  (tmp_path / "config.json").write_text(json.dumps(old))
  validate.check_workdir(config, str(tmp_path), allow_config_change=False)
  old["moe"]["dispatch"] = "einsum"
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(validate.ConfigError, match="other moe.dispatch"):
    validate.check_workdir(config, str(tmp_path), allow_config_change=False)


def _old_flatten(config, prefix=""):
  """validate.flatten as it was, by hand."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_old_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def test_flatten_matches_the_hand_written_walk():
  base = config_base.base_config()
  nested = ml_collections.ConfigDict(
      {"a": 1, "b": {"c": {"d": 2.0}, "e": {}}, "f": ml_collections.ConfigDict()})
  as_json = json.loads(base.to_json())
  mixed = {"x": ml_collections.ConfigDict({"y": 1}), "z": {}}
  for tree in (base, nested, as_json, mixed, experiment()):
    assert validate.flatten(tree) == _old_flatten(tree)
  assert validate.flatten(nested, "p.") == {"p.a": 1, "p.b.c.d": 2.0}


# --- Through the command line: one line, exit 1, nothing on disk. ---

CLI = [
    # Of the twelve that once ended in tracebacks or wrote files, one of
    # each kind (an int range, a float range, a choice, two keys together);
    # the rest take the same path and are checked in-process above
    # (test_hand_written_bad_values), a JAX start-up cheaper each.
    ("model.d_model=0", r"model\.d_model must be an int >= 1, got 0"),
    ("moe.router_jitter=2", r"moe\.router_jitter must be .*, got 2\.0"),
    ("model.dtype=float8", r"model\.dtype must be one of"),
    ("train.schedule=cosine --config.train.warmup_steps=300",
     r"train\.schedule='cosine' needs"),
    # Values ml_collections parses (nan) or refuses at parse time.
    ("train.learning_rate=nan", r"train\.learning_rate must be .*, got nan"),
    ("model.d_model=1.5", r"flag --config\.model\.d_model=1\.5: invalid literal "
     r"for int\(\)"),
    ("model.tie_embeddings=2", r"flag --config\.model\.tie_embeddings=2: .*"
     r"Non-boolean argument"),
]


def _cli(args, workdir):
  env = {**os.environ,
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  command = [sys.executable, "-m", "switchjax.main", "--config",
             f"{EXPERIMENT}:tiny", "--workdir", str(workdir)]
  command += [f"--config.{a}" for a in args.split(" --config.")]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def _snapshot(root):
  return {os.path.relpath(os.path.join(d, n), root):
          open(os.path.join(d, n), "rb").read()
          for d, _, names in os.walk(root) for n in names}


def test_bad_values_on_the_command_line_are_one_line(tmp_path):
  # An existing workdir (as a run leaves it) meets the one that once ran a
  # whole run: moe.min_capacity=0.
  existing = tmp_path / "existing"
  existing.mkdir()
  validate.write_config(validate.prepare(experiment(), 8), str(existing))
  (existing / "metrics.jsonl").write_text('{"step": 1}\n')
  before = _snapshot(existing)
  jobs = [(args, tmp_path / f"new{i}" / "w", message)
          for i, (args, message) in enumerate(CLI)]
  jobs.append(("moe.min_capacity=0", existing,
               r"moe\.min_capacity must be an int >= 1, got 0"))
  with ThreadPool(2) as pool:
    outs = pool.map(lambda job: _cli(job[0], job[1]), jobs)
  for (args, workdir, message), out in zip(jobs, outs):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, (args, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, (args, out.stderr[-2000:])
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], (args, out.stderr)
    assert re.search(message, errors[0]), (args, errors[0])
    if workdir != existing:
      assert not workdir.parent.exists(), args
  assert _snapshot(existing) == before
