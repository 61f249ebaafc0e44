"""A new run's step-0 params from trained weights: `train.init_from`.

A source is a switchjax workdir (the params of its newest checkpoint step;
its optimizer state and data position stay behind) or a Hugging Face
directory (config.json + *.safetensors, read as `switchjax.convert from-hf`
reads it). `open_source` reads what a refusal needs (paths and shapes) and
nothing more, so a source that does not fit is refused before the run
writes anything; `Start.read` reads the arrays once the run holds its
workdir and has no checkpoint of its own. `switchjax/upcycle.py` starts
from a source in its own way (dense FFN -> experts).

Params travel flat, keyed by their path in
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` joined by '/', e.g.
'decoder/layers/1/mlp/experts/wi' -> f32[E, M, H].
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

from etils import epath
from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

from switchjax import checkpoint as ckpt_lib
from switchjax import checksums
from switchjax import faults
from switchjax import hf_checkpoint
from switchjax import hf_files
from switchjax import validate

ConfigError = validate.ConfigError
# path -> (shape, dtype name)
Shapes = dict[str, tuple[tuple[int, ...], str]]
# (param path, fresh value f32[...], source arrays by path) -> the start value
Pick = Callable[[str, jax.Array, dict[str, jax.Array]], jax.Array]


def path_key(path) -> str:
  """A jax key path -> 'decoder/layers/0/mlp/wi'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def flat(tree: Any) -> dict[str, Any]:
  """{'decoder/layers/0/mlp/wi': leaf} of a nested dict (a pure dict of params)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_key(p): leaf for p, leaf in leaves}


def shapes_of(params: nnx.State) -> Shapes:
  """The Shapes of a (possibly abstract) nnx.State of params."""
  return {k: (tuple(v.shape), str(v.dtype))
          for k, v in flat(nnx.to_pure_dict(params)).items()}


def shardings_of(abstract_params: nnx.State) -> dict[str, Any]:
  """path -> sharding of the trainer's abstract params (ShapeDtypeStructs)."""
  return {k: v.sharding
          for k, v in flat(nnx.to_pure_dict(abstract_params)).items()}


@dataclasses.dataclass
class Source:
  """Trained weights on disk, described without reading their arrays.

  read: {path: sharding} -> {path: jax.Array placed so}, for every path of
    `shapes` (collective: every process calls it).
  """
  path: str
  step: Optional[int]  # the workdir's checkpoint step; None for Hugging Face
  shapes: Shapes
  read: Callable[[dict[str, Any]], dict[str, jax.Array]]

  def describe(self) -> str:
    return (f"{self.path} (step {self.step})" if self.step is not None
            else f"{self.path} (Hugging Face)")


def check_fits(key: str, source: Source, wanted: Shapes,
               names: Optional[dict[str, str]] = None) -> None:
  """Refuses (ConfigError) a source whose param paths or shapes differ from
  `wanted`, naming the first differing path and both shapes.

  Dtypes may differ: values are cast to the model's (float32) dtype.
  names: source path -> how the message names it, where the model's
    parameter has another path (upcycling's experts).
  """
  names = names or {}
  got = source.shapes
  diffs = []
  for path in sorted(set(got) | set(wanted)):
    name = names.get(path, path)
    if path not in got:
      diffs.append(f"{name} is missing there, {ckpt_lib.fmt_shape(wanted[path])} here")
    elif path not in wanted:
      diffs.append(f"{name} is {ckpt_lib.fmt_shape(got[path])} there and absent here")
    elif got[path][0] != wanted[path][0]:
      diffs.append(f"{name} is {ckpt_lib.fmt_shape(got[path])} there, "
                   f"{ckpt_lib.fmt_shape(wanted[path])} here")
  if diffs:
    more = f"; {len(diffs) - 1} more differences" if len(diffs) > 1 else ""
    raise ConfigError(f"{key}={source.path} does not fit this model "
                      f"({diffs[0]}{more})")


def _saved_key(path) -> str:
  """The param path of a leaf of a checkpoint's saved params: a saved
  nnx.State keeps each Param's array under 'value'."""
  return path_key(path).removesuffix("/value")


def _state_metadata(path: str, key: str, step: int) -> dict:
  """The saved train state's tree of ArrayMetadata (shape, dtype); reads
  no arrays."""
  try:
    meta = ckpt_lib.state_metadata(path, step)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{key}={path}: checkpoint step {step} is unreadable "
                      f"({faults.one_line(e)})") from None
  meta = getattr(meta, "tree", meta)
  if not isinstance(meta, dict) or "params" not in meta:
    raise ConfigError(f"{key}={path}: checkpoint step {step} holds no params")
  return meta


def _workdir_source(path: str, key: str) -> Source:
  """The params of the newest checkpoint step of a switchjax workdir."""
  step = ckpt_lib.steps_on_disk(path)[-1]
  step_dir = os.path.join(ckpt_lib.checkpoint_dir(path), str(step))
  # Checked now, not at read: a bad source is refused before the run starts.
  why = checksums.mismatch(step_dir)
  if why:
    raise ConfigError(f"{key}={path}: checkpoint step {step} is corrupt "
                      f"({why})")
  state_dir = epath.Path(step_dir) / "state"
  saved = _state_metadata(path, key, step)["params"]
  shapes = {_saved_key(p): (tuple(m.shape), str(np.dtype(m.dtype)))
            for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}

  def read(shardings: dict[str, Any]) -> dict[str, jax.Array]:
    item = {"params": jax.tree_util.tree_map_with_path(
        lambda p, m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                          sharding=shardings[_saved_key(p)]),
        saved)}
    # partial_restore: the params alone; the optimizer state is never read.
    # Orbax directly, not a Checkpointer: that would tidy SRC's checkpoints/.
    with ocp.PyTreeCheckpointer() as ckpt:
      restored = ckpt.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
    return {_saved_key(p): a for p, a in
            jax.tree_util.tree_flatten_with_path(restored["params"])[0]}

  return Source(path=path, step=step, shapes=shapes, read=read)


def _hf_source(path: str, key: str) -> Source:
  """The params of a Hugging Face directory, as `switchjax.convert from-hf`
  maps them."""
  try:
    _, params, _ = hf_checkpoint.read_hf(path)
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(f"{key}={path}: {faults.one_line(e)}") from None
  # ('decoder', 'layers', 0, 'mlp', 'wi') -> 'decoder/layers/0/mlp/wi'
  arrays = {"/".join(map(str, k)): np.asarray(v) for k, v in params.items()}

  def read(shardings: dict[str, Any]) -> dict[str, jax.Array]:
    # Every process holds every array: each copies in its own shards.
    return {k: jax.make_array_from_callback(a.shape, shardings[k],
                                            lambda index, a=a: a[index])
            for k, a in arrays.items()}

  return Source(path=path, step=None, read=read,
                shapes={k: (a.shape, str(a.dtype)) for k, a in arrays.items()})


def open_source(path: str, key: str) -> Source:
  """The weights at `path` (the value of config key `key`); ConfigError
  (one line) if there are none."""
  if not os.path.isdir(path):
    raise ConfigError(f"{key}={path}: no such directory")
  if ckpt_lib.steps_on_disk(path):
    return _workdir_source(path, key)
  if hf_files.is_hf_dir(path):
    return _hf_source(path, key)
  raise ConfigError(
      f"{key}={path} is neither a switchjax workdir with checkpoints "
      "(checkpoints/<step>/) nor a Hugging Face directory (config.json and "
      "safetensors or pytorch_model.bin)")


@dataclasses.dataclass
class Start:
  """How a new run's step-0 params come from a source.

  shardings: source path -> where its array is read to.
  pick: (param path, fresh value, source arrays) -> the param's start
    value; traced inside the trainer's jitted init, where XLA drops the
    fresh initialisers that no pick returns.
  """
  source: Source
  shardings: dict[str, Any]
  pick: Pick
  line: str  # what the run logs when it starts from these weights

  def read(self) -> dict[str, jax.Array]:
    return self.source.read(self.shardings)

  def params(self, fresh: nnx.State,
             arrays: dict[str, jax.Array]) -> nnx.State:
    """fresh: the model's freshly initialised params (nnx.State); arrays:
    `read()`'s. The start params, in `fresh`'s structure."""
    pure = jax.tree_util.tree_map_with_path(
        lambda p, v: self.pick(path_key(p), v, arrays), nnx.to_pure_dict(fresh))
    nnx.replace_by_pure_dict(fresh, pure)
    return fresh


def start(path: str, abstract_params: nnx.State) -> Start:
  """train.init_from=path: every param of the model from the source, which
  must hold exactly the model's paths and shapes (ConfigError otherwise).

  abstract_params: the trainer's, ShapeDtypeStructs with shardings.
  """
  key = "train.init_from"
  source = open_source(path, key)
  check_fits(key, source, shapes_of(abstract_params))
  return Start(source=source, shardings=shardings_of(abstract_params),
               pick=lambda p, fresh, arrays: arrays[p].astype(fresh.dtype),
               line=f"params from {source.describe()}")
