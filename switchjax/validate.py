"""What a config may be, checked before any work, one clear line each.

First every key's kind and range (`switchjax.config_schema.SCHEMA`), then
what keys say together (K <= E, causal decoders, group sizes, span
corruption lengths, the schedule, the mesh, the sharding rules, the
vocabulary and the data), then the workdir. Everything here raises
`ConfigError` (a ValueError) with a message that names the key at fault;
main.py prints it and exits 1 without touching the workdir. Modules keep
only assertions on their own arguments; the wording of a config refusal
lives here (or in the owner's function this file calls, such as
`model.causal_error` and `partitioning.check_mesh`).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any, Optional

import jax
import ml_collections

from switchjax import config_base
from switchjax import config_schema
from switchjax import dispatch
from switchjax import model
from switchjax import partitioning
from switchjax import routing
from switchjax.data import span_corruption


# The public names of the schema, where callers have always found them.
ConfigError = config_schema.ConfigError
flatten = config_schema.flatten


# Keys a resumed run may change freely: they steer the run, not the experiment.
RUN_KEYS = ("train.num_steps", "train.log_every", "train.eval_every",
            "train.eval_steps", "train.checkpoint_every", "train.max_to_keep",
            "mesh.data", "mesh.expert", "mesh.model", "moe.expert_parallel",
            "model.remat")
# Keys it may change only with --allow_config_change: the optimisation
# schedule and evaluation, which change what follows but not the model.
SAFE_KEYS = ("train.learning_rate", "train.schedule", "train.warmup_steps",
             "train.grad_clip", "train.weight_decay", "train.nan_policy",
             "train.label_smoothing", "moe.eval_capacity_factor",
             "moe.dispatch", "data.exact_match_examples")  # 'gather' == 'einsum', but 'dropless' drops nothing


def _is_run_key(key: str) -> bool:
  # Sharding rules, like the mesh, change where arrays live, not their values.
  return key in RUN_KEYS or key.startswith("partitioning.rules.")


# ---------------------------------------------------------------------------
# The checks.


def _check_model(config) -> None:
  m = config.model
  if m.arch != "encoder_decoder" and m.separate_encoder_embedding:
    raise ConfigError("model.separate_encoder_embedding=True needs an "
                      f"encoder: model.arch is {m.arch!r}")
  if m.arch == "encoder_decoder" and m.num_encoder_layers < 1:
    raise ConfigError("model.num_encoder_layers must be >= 1 in an "
                      f"encoder_decoder, got {m.num_encoder_layers}")
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads="
        f"{m.num_heads}: each key/value head serves num_heads / num_kv_heads "
        "query heads")
  if m.position_embedding == "rope":
    if m.head_dim % 2:
      raise ConfigError(f"model.position_embedding='rope' rotates pairs of "
                        f"dims: model.head_dim must be even, got {m.head_dim}")
    return  # the relative-bias keys below are unused
  # attention.relative_position_bucket: a bidirectional (encoder) stack splits
  # the buckets between the two directions; each direction keeps half of its
  # buckets for exact offsets (max_exact) and log-spaces the rest up to
  # max_distance, dividing by max_exact and by log(max_distance / max_exact).
  buckets, distance = (m.relative_attention_num_buckets,
                       m.relative_attention_max_distance)
  if m.arch == "encoder_decoder" and buckets < 4:
    raise ConfigError(
        "model.relative_attention_num_buckets must be >= 4 in an "
        "encoder_decoder (the encoder's two directions need an exact bucket "
        f"each), got {buckets}")
  if distance <= buckets // 2:
    raise ConfigError(
        f"model.relative_attention_max_distance must be > "
        f"model.relative_attention_num_buckets // 2 = {buckets // 2} (the "
        "decoder's exact offsets; the log-spaced buckets lie beyond), got "
        f"{distance}")


def _check_moe(config) -> None:
  e, d, t = config.moe, config.data, config.train
  if e.num_experts == 0:
    return
  if e.sparse_offset >= e.sparse_every:
    raise ConfigError(
        f"moe.sparse_offset={e.sparse_offset} must be < moe.sparse_every="
        f"{e.sparse_every} (or -1): layer i is sparse iff i % sparse_every "
        "== sparse_offset")
  lengths = ({"encoder": d.inputs_length, "decoder": d.targets_length}
             if config.model.arch == "encoder_decoder"
             else {"decoder": d.seq_length})
  granular = e.expert_granularity > 1 or e.num_shared_experts > 0
  width = e.d_ff if e.d_ff > 0 else config.model.d_ff
  if width % e.expert_granularity:
    raise ConfigError(
        f"moe.expert_granularity={e.expert_granularity} does not divide the "
        f"experts' d_ff {width}: each expert splits into experts of width "
        "d_ff / granularity")
  for stack in lengths:
    router = model.stack_router(e, stack)
    key = f"moe.{stack}_router" if e[f"{stack}_router"] else "moe.router"
    k = routing.experts_per_token(router, e.num_selected)
    if k > e.num_experts:
      chosen = "" if router in routing.FIXED_K else " (moe.num_selected)"
      raise ConfigError(
          f"{key}={router!r} sends each token to K={k} experts{chosen}, more "
          f"than moe.num_experts={e.num_experts}")
    if granular and router in routing.FIXED_K:
      raise ConfigError(
          f"moe.expert_granularity / moe.num_shared_experts choose "
          f"granularity x K experts per token: {key}={router!r} fixes its K; "
          "use 'topk', 'noisy_topk' or 'loss_free'")
    if granular and model.routed_shape(e, router)[1] < 1:
      raise ConfigError(
          f"moe.num_shared_experts={e.num_shared_experts} takes all of the "
          f"{e.expert_granularity * k} experts per token (granularity x "
          "moe.num_selected): none would be routed")
    if stack == "decoder" and not routing.is_causal(router,
                                                    e.batch_prioritized):
      prefix = "" if e.batch_prioritized else f"{key}: "
      raise ConfigError(prefix + model.causal_error(router,
                                                    e.batch_prioritized))
    if router == "soft" and e.expert_parallel != "gspmd":
      raise ConfigError(f"{key}='soft' runs with moe.expert_parallel='gspmd', "
                        f"not {e.expert_parallel!r}")
    if dispatch.canonical(e.dispatch) == "dropless" and router == "expert_choice":
      raise ConfigError(
          f"moe.dispatch='dropless' needs token-choice routers; {key}="
          f"{router!r} has no per-token choices to sort")
    tokens = t.batch_size * lengths[stack]
    if e.group_size == 0:  # one group per sequence: always divides
      continue
    group = min(e.group_size, tokens)
    if tokens % group:
      raise ConfigError(
          f"moe.group_size={e.group_size} does not divide the {stack}'s "
          f"{tokens} tokens per batch (train.batch_size={t.batch_size} x "
          f"length {lengths[stack]})")


def _too_short(d, needs: str) -> ConfigError:
  return ConfigError(
      f"data.targets_length={d.targets_length} is too short for span "
      f"corruption of data.inputs_length={d.inputs_length} at noise_density="
      f"{d.noise_density}, mean_noise_span_length={d.mean_noise_span_length}:"
      f" it needs {needs}")


def _too_dense(d, detail: str) -> ConfigError:
  span = d.mean_noise_span_length
  return ConfigError(
      f"data.noise_density={d.noise_density} is too high for "
      f"data.mean_noise_span_length={span}: every noise span needs a "
      f"non-noise token before it ({detail}); use a noise_density <= about "
      f"{span / (span + 1):.4g}")


def _check_span_corruption(config, extra_ids: int) -> None:
  """The lengths span_corruption really makes fit; its sentinels exist.

  pipeline.py cuts raw examples of random_spans_helper's length L;
  random_spans_noise_mask then draws round(L * density) noise tokens (at
  least 1, at most L - 1) in round(noise / mean span) spans (at least 1),
  each after a non-noise span: with more spans than non-noise tokens the
  mask's spans would overlap and the outputs outgrow their lengths.
  """
  d = config.data
  density, span = d.noise_density, d.mean_noise_span_length
  # Cheap bounds first: random_spans_helper counts L up one by one.
  if density > span / (span + 1):
    raise _too_dense(d, "noise spans would outnumber the non-noise tokens")
  inputs_per_raw = (1 - density) + density / span
  approx = d.inputs_length / inputs_per_raw * density * (1 + 1 / span) + 1
  if approx > 2 * d.targets_length + 2:
    raise _too_short(d, f"about {int(approx)}")
  raw, _ = span_corruption.random_spans_helper(d.inputs_length, density, span)
  length = max(raw, 2)
  noise = min(max(int(round(length * density)), 1), length - 1)
  spans = max(int(round(noise / span)), 1)
  nonnoise = length - noise
  if spans > nonnoise or nonnoise + spans + 1 > d.inputs_length:
    raise _too_dense(d, f"{spans} noise spans and {nonnoise} non-noise tokens "
                     f"in a raw example of {length}")
  if noise + spans + 1 > d.targets_length:
    raise _too_short(d, str(noise + spans + 1))
  if spans > extra_ids:
    raise ConfigError(
        f"data.inputs_length={d.inputs_length} at noise_density={density}, "
        f"mean_noise_span_length={span} makes {spans} noise spans, more than "
        f"the vocabulary's {extra_ids} sentinels")


def _check_schedule(config) -> None:
  t = config.train
  if t.schedule == "rsqrt" and t.warmup_steps < 1:
    raise ConfigError("train.schedule='rsqrt' needs train.warmup_steps >= 1 "
                      f"(the constant-peak steps), got {t.warmup_steps}")
  if t.schedule == "cosine" and t.num_steps <= t.warmup_steps:
    raise ConfigError(
        f"train.schedule='cosine' needs train.num_steps ({t.num_steps}) > "
        f"train.warmup_steps ({t.warmup_steps})")


def _check_start(config) -> None:
  """train.init_from / train.upcycle_from: at most one, upcycling into an MoE.
  The sources themselves are read by init_from.py and upcycle.py."""
  t = config.train
  if t.init_from and t.upcycle_from:
    raise ConfigError(
        f"train.init_from={t.init_from} and train.upcycle_from="
        f"{t.upcycle_from} are both set; a run starts from one of them")
  if t.distill_init and not t.distill_from:
    raise ConfigError("train.distill_init starts the student from the teacher's "
                      "weights, but train.distill_from is not set")
  if t.distill_init and (t.init_from or t.upcycle_from):
    raise ConfigError("train.distill_init and train."
                      f"{'init_from' if t.init_from else 'upcycle_from'} are "
                      "both set; a run starts from one of them")
  if t.upcycle_from and config.moe.num_experts == 0:
    raise ConfigError(
        f"train.upcycle_from={t.upcycle_from} builds an MoE model, but "
        "moe.num_experts=0 (dense); set moe.num_experts")


def _check_mesh(config, num_devices: int) -> None:
  try:
    shape = partitioning.check_mesh(config, num_devices)
    rules = partitioning.rules_from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  sizes = dict(zip(partitioning.MESH_AXES, shape))
  shards = sizes["data"] * sizes["expert"]
  if config.train.batch_size % shards:
    raise ConfigError(
        f"train.batch_size={config.train.batch_size} is not divisible by the "
        f"{shards} batch shards (mesh data x expert)")
  if config.train.batch_size % jax.process_count():
    raise ConfigError(
        f"train.batch_size={config.train.batch_size} is not divisible by the "
        f"{jax.process_count()} processes")
  e = config.moe
  if e.num_experts and e.expert_parallel == "shard_map":
    split = math.prod(sizes[a] for a in rules["expert"])
    if e.num_experts % split:
      raise ConfigError(
          f"moe.num_experts={e.num_experts} is not divisible by the {split} "
          f"devices of partitioning.rules.expert={config.partitioning.rules.expert!r}"
          " (moe.expert_parallel='shard_map')")


def _check_data(config) -> None:
  """Prepared tfds data (C4 and the like) must be there; the bundled corpus
  is built on first use, outside the workdir."""
  from switchjax.data import tfds_corpus  # pylint: disable=g-import-not-at-top
  if config.data.name in tfds_corpus.BUNDLED_NAMES:
    return
  try:
    for split in ("train", "validation"):
      tfds_corpus.data_source(config.data.name, split,
                              config.data.data_dir or None)
  except (OSError, ValueError) as e:
    raise ConfigError(f"data.name: {' '.join(str(e).split())}") from None


def check_config(config: ml_collections.ConfigDict,
                 num_devices: Optional[int] = None) -> None:
  """Every key's kind and range, then the checks across keys, without the
  files (vocabulary, data): ConfigError on the first problem."""
  flat = flatten(config)
  config_schema.check_keys(flat)
  config_schema.check_values(flat)
  _check_model(config)
  _check_moe(config)
  _check_schedule(config)
  _check_start(config)
  _check_mesh(config, num_devices or jax.device_count())


def prepare(config: ml_collections.ConfigDict,
            num_devices: Optional[int] = None) -> ml_collections.ConfigDict:
  """A validated copy of config: model.vocab_size set from the data (kept
  with train.init_from: the weights fix it, and it must hold the data's
  ids) and moe.dispatch under its current name ('fast' -> 'gather')."""
  from switchjax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  check_config(config, num_devices)
  try:
    vocab = data_lib.get_vocabulary(config)
  except (OSError, ValueError) as e:
    raise ConfigError(f"data.vocab_path: {e}") from None
  _check_data(config)
  if config.data.train_examples and not data_lib.is_task_data(config):
    raise ConfigError(
        f"data.train_examples={config.data.train_examples}: only a text-to-"
        f"text task (e.g. data.name=kjv_books) has examples to cut; "
        f"data.name={config.data.name!r} is a corpus")
  if config.model.arch == "encoder_decoder" and not data_lib.is_task_data(config):
    _check_span_corruption(config, vocab.extra_ids)
  if not config.train.init_from:
    config.model.vocab_size = vocab.vocab_size
  elif vocab.vocab_size > config.model.vocab_size:
    raise ConfigError(
        f"model.vocab_size={config.model.vocab_size} (the size of the "
        f"train.init_from weights' vocabulary) is smaller than the data "
        f"vocabulary's {vocab.vocab_size} ids")
  config.moe.dispatch = dispatch.canonical(config.moe.dispatch)
  return config


# ---------------------------------------------------------------------------
# The workdir.


def _config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def _check_writable(workdir: str) -> None:
  """The workdir, or the nearest folder that exists above it, is writable."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = "" if path == os.path.abspath(workdir) else f" ({path})"
    raise ConfigError(f"--workdir {workdir}: a file is in the way{where}; "
                      "it must be a directory")
  # os.access also reports a read-only filesystem, even to root.
  if not os.access(path, os.W_OK | os.X_OK):
    where = "" if path == os.path.abspath(workdir) else f" ({path})"
    raise ConfigError(f"--workdir {workdir} is not writable{where}")


def canonical_values(flat: dict[str, Any]) -> dict[str, Any]:
  """Flat config values under their current names ('fast' -> 'gather'), so
  that a workdir written before a rename compares equal."""
  out = dict(flat)
  if isinstance(out.get("moe.dispatch"), str):
    out["moe.dispatch"] = dispatch.canonical(out["moe.dispatch"])
  return out


def check_workdir(config, workdir: str, allow_config_change: bool) -> None:
  """Refuses a workdir that holds another experiment, or that we can't write."""
  _check_writable(workdir)
  path = _config_path(workdir)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = canonical_values(flatten(config_base.with_defaults(json.load(f))))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({e}); refusing to reuse "
                      "this workdir") from None
  new = canonical_values(flatten(config))
  changed = sorted(k for k in set(old) | set(new)
                   if old.get(k) != new.get(k) and not _is_run_key(k))
  if not changed:
    return
  unsafe = [k for k in changed if k not in SAFE_KEYS]
  if unsafe:
    raise ConfigError(
        f"--workdir {workdir} holds a run of another config (differs in: "
        f"{', '.join(unsafe)}); use a new workdir")
  if not allow_config_change:
    raise ConfigError(
        f"--workdir {workdir} holds a run with other {', '.join(changed)}; "
        "pass --allow_config_change to continue it with the new values")


def write_config(config, workdir: str) -> None:
  """Writes config.json; a different one already there goes to config_history/.

  A resumed run may change run-control and (allowed) safe keys: the history
  keeps what each part of the run used.
  """
  path = _config_path(workdir)
  text = config.to_json(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%S.%fZ")
    history = os.path.join(workdir, "config_history")
    os.makedirs(history, exist_ok=True)
    with open(os.path.join(history, f"config-{stamp}.json"), "w") as f:
      f.write(old)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
