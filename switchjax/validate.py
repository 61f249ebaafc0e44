"""Checks a run's config and workdir before any work, one clear line each.

Everything here raises `ConfigError` (a ValueError) with a message that
names the key at fault; main.py prints it and exits 1 without touching the
workdir.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Optional

import jax
import ml_collections

from switchjax import config_base
from switchjax import partitioning
from switchjax import routing


class ConfigError(ValueError):
  """A config or workdir that cannot run."""


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
             "moe.dispatch")  # 'fast' == 'einsum', but 'dropless' drops nothing


def _is_run_key(key: str) -> bool:
  # Sharding rules, like the mesh, change where arrays live, not their values.
  return key in RUN_KEYS or key.startswith("partitioning.rules.")


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _check_keys(config) -> None:
  known = flatten(config_base.base_config())
  unknown = sorted(set(flatten(config)) - set(known))
  if unknown:
    raise ConfigError(f"unknown config keys: {', '.join(unknown)}")


def _check_moe(config) -> None:
  m, e = config.model, config.moe
  if e.num_experts < 0:
    raise ConfigError(f"moe.num_experts must be >= 0, got {e.num_experts}")
  if e.num_experts == 0:
    return
  for key in ("train_capacity_factor", "eval_capacity_factor"):
    if not e[key] > 0:
      raise ConfigError(f"moe.{key} must be > 0, got {e[key]}")
  if e.sparse_every < 1:
    raise ConfigError(f"moe.sparse_every must be >= 1, got {e.sparse_every}")
  stacks = (("decoder",) if m.arch == "decoder_only"
            else ("encoder", "decoder"))
  for stack in stacks:
    router = e[f"{stack}_router"] or e.router
    if router not in routing.ROUTERS:
      raise ConfigError(
          f"moe.{stack}_router/moe.router: unknown router {router!r}; "
          f"expected one of {routing.ROUTERS}")
    if stack == "decoder" and router == "expert_choice":
      raise ConfigError(
          "expert_choice routing in the decoder leaks future tokens; use it "
          "in the encoder only (moe.encoder_router) ")
    if stack == "decoder" and e.batch_prioritized:
      raise ConfigError(
          "moe.batch_prioritized in the decoder leaks future tokens")
    k = {"switch": 1, "gshard": 2, "expert_choice": 1}.get(router,
                                                            e.num_selected)
    if not 1 <= k <= e.num_experts:
      raise ConfigError(
          f"moe.num_selected={k} must be in [1, moe.num_experts="
          f"{e.num_experts}] for router {router!r}")
  if e.dispatch not in ("fast", "einsum", "dropless"):
    raise ConfigError(
        f"moe.dispatch must be 'fast', 'einsum' or 'dropless', got "
        f"{e.dispatch!r}")
  if e.expert_parallel not in ("gspmd", "shard_map"):
    raise ConfigError(
        f"moe.expert_parallel must be 'gspmd' or 'shard_map', got "
        f"{e.expert_parallel!r}")
  if e.dispatch == "dropless" and "expert_choice" in (
      e.router, e.encoder_router, e.decoder_router):
    raise ConfigError(
        "moe.dispatch='dropless' needs token-choice routers; expert_choice "
        "has no per-token choices to sort")
  if e.group_size < 1:
    raise ConfigError(f"moe.group_size must be >= 1, got {e.group_size}")
  d, t = config.data, config.train
  lengths = ({"encoder": d.inputs_length, "decoder": d.targets_length}
             if m.arch == "encoder_decoder" else {"decoder": d.seq_length})
  for stack, length in lengths.items():
    tokens = t.batch_size * length
    group = min(e.group_size, tokens)
    if tokens % group:
      raise ConfigError(
          f"moe.group_size={e.group_size} does not divide the {stack}'s "
          f"{tokens} tokens per batch (train.batch_size={t.batch_size} x "
          f"length {length})")


def _check_mesh(config, num_devices: int) -> None:
  try:
    data, expert, model = partitioning.mesh_shape(config, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.moe.num_experts and config.moe.num_experts % expert:
    raise ConfigError(
        f"moe.num_experts={config.moe.num_experts} is not divisible by the "
        f"mesh's expert axis ({expert})")
  shards = data * expert
  if config.train.batch_size % shards:
    raise ConfigError(
        f"train.batch_size={config.train.batch_size} is not divisible by the "
        f"{shards} batch shards (mesh data x expert)")
  if config.train.batch_size % jax.process_count():
    raise ConfigError(
        f"train.batch_size={config.train.batch_size} is not divisible by the "
        f"{jax.process_count()} processes")
  del model


def _check_train(config) -> None:
  t = config.train
  for key in ("num_steps", "batch_size", "log_every", "eval_every",
              "eval_steps", "checkpoint_every", "max_to_keep"):
    if t[key] < 1:
      raise ConfigError(f"train.{key} must be >= 1, got {t[key]}")
  if config.moe.router_dtype not in ("float32", "bfloat16"):
    raise ConfigError(
        f"moe.router_dtype must be 'float32' (or 'bfloat16' for the "
        f"instability ablation), got {config.moe.router_dtype!r}")
  if t.nan_policy not in ("stop", "skip"):
    raise ConfigError(
        f"train.nan_policy must be 'stop' or 'skip', got {t.nan_policy!r}")
  if config.model.arch not in ("encoder_decoder", "decoder_only"):
    raise ConfigError(
        f"model.arch must be 'encoder_decoder' or 'decoder_only', got "
        f"{config.model.arch!r}")


def prepare(config: ml_collections.ConfigDict,
            num_devices: Optional[int] = None) -> ml_collections.ConfigDict:
  """A validated copy of config with model.vocab_size set from the data."""
  from switchjax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  _check_keys(config)
  _check_train(config)
  _check_moe(config)
  _check_mesh(config, num_devices or jax.device_count())
  try:
    partitioning.rules_from_config(config)
  except ValueError as e:
    raise ConfigError(f"partitioning.rules: {e}") from None
  try:
    vocab = data_lib.get_vocabulary(config)
  except (OSError, ValueError) as e:
    raise ConfigError(f"data.vocab_path: {e}") from None
  _check_data(config)
  config.model.vocab_size = vocab.vocab_size
  return config


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


def check_workdir(config, workdir: str, allow_config_change: bool) -> None:
  """Refuses a workdir that holds another experiment, or that we can't write."""
  _check_writable(workdir)
  path = _config_path(workdir)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = flatten(ml_collections.ConfigDict(json.load(f)))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({e}); refusing to reuse "
                      "this workdir") from None
  new = flatten(config)
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
