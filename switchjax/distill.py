"""Distillation (`train.distill_from`): a student trained on a teacher's soft targets.

Switch §5 (Tables 6-7) distils sparse models into dense ones: the student's
loss is `alpha * CE(teacher probabilities) + (1 - alpha) * CE(labels)`
(`train.distill_alpha`, Switch's 0.25), and the student may start from the
teacher's non-expert weights (`train.distill_init`): every parameter of the
student whose path and shape the teacher has, except experts and routers
(which a dense student has none of, and a sparse one keeps fresh).

The teacher is another workdir: its own config.json builds its model, in eval
mode (eval capacity factor, no dropout), from its newest checkpoint. It must
read the student's batches: the same architecture and vocabulary size. Its
params are replicated on every device of the student's mesh (fine at the
sizes this runs at here; a teacher too big for one device needs them
sharded by its own rules).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from switchjax import freeze
from switchjax import init_from
from switchjax import model as model_lib
from switchjax import partitioning
from switchjax import weights
from switchjax.validate import ConfigError

KEY = "train.distill_from"


@dataclasses.dataclass
class Teacher:
  """A teacher model, ready to run inside the student's train step."""
  config: ml_collections.ConfigDict
  graphdef: Any  # eval mode
  params: nnx.State  # replicated on the student's mesh
  rng_state: Any
  line: str  # what the run logs


def _teacher_config(path: str) -> ml_collections.ConfigDict:
  try:
    return weights.read_config(path)
  except weights.WeightsError as e:
    raise ConfigError(f"{KEY}: {e} (the teacher must be a switchjax workdir; "
                      "convert a Hugging Face checkpoint first)") from None


def _check_compatible(teacher: ml_collections.ConfigDict,
                      student: ml_collections.ConfigDict, path: str) -> None:
  for key in ("arch", "vocab_size"):
    a, b = teacher.model[key], student.model[key]
    if a != b:
      raise ConfigError(f"{KEY}={path}: the teacher's model.{key}={a!r} is not "
                        f"the student's {b!r}; it must read the same batches")


def load(path: str, student: ml_collections.ConfigDict,
         mesh: jax.sharding.Mesh) -> Teacher:
  """The teacher at `path` for a run of `student` on `mesh` (ConfigError,
  one line, if it cannot be)."""
  config = _teacher_config(path)
  source = init_from.open_source(path, KEY)
  _check_compatible(config, student, path)
  rngs = lambda: nnx.Rngs(params=0, dropout=1, router=2)  # pylint: disable=unnecessary-lambda-assignment
  abstract = nnx.eval_shape(lambda: model_lib.build_model(config, rngs=rngs()))
  abstract.eval()
  graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
  init_from.check_fits(KEY, source, init_from.shapes_of(params))
  rep = partitioning.replicated(mesh)
  arrays = source.read({p: rep for p in source.shapes})
  pure = jax.tree_util.tree_map_with_path(
      lambda p, _: arrays[init_from.path_key(p)], nnx.to_pure_dict(params))
  nnx.replace_by_pure_dict(params, pure)
  rng_state = jax.jit(lambda: nnx.split(model_lib.build_model(
      config, rngs=rngs()), nnx.Param, ...)[2], out_shardings=rep)()
  return Teacher(config=config, graphdef=graphdef, params=params,
                 rng_state=rng_state,
                 line=f"distilling from {source.describe()}")


def init_start(path: str, abstract_params: nnx.State,
               mesh: jax.sharding.Mesh) -> init_from.Start:
  """train.distill_init: the student's params from the teacher's non-expert
  weights where path and shape agree; the rest fresh."""
  source = init_from.open_source(path, KEY)
  wanted = init_from.shapes_of(abstract_params)
  copied = {p for p, (shape, _) in wanted.items()
            if p in source.shapes and source.shapes[p][0] == shape
            and not freeze.is_frozen(p, "moe")}
  if not copied:
    raise ConfigError(f"train.distill_init: the teacher {path} has no "
                      "non-expert parameter of the student's paths and shapes")

  def pick(p, fresh, arrays):
    return arrays[p].astype(fresh.dtype) if p in copied else fresh

  rep = partitioning.replicated(mesh)
  return init_from.Start(
      source=source, shardings={p: rep for p in source.shapes}, pick=pick,
      line=f"params from {source.describe()}: its {len(copied)} non-expert "
           f"arrays of {len(wanted)} (train.distill_init)")


def teacher_logits(teacher: Teacher, params: nnx.State,
                   inputs: dict[str, jax.Array]) -> jax.Array:
  """The teacher's logits f32[B, L, V] on the student's model inputs."""
  model = nnx.merge(teacher.graphdef, params, teacher.rng_state)
  logits, _ = model(**inputs)
  return jax.lax.stop_gradient(logits.astype(jnp.float32))


def soft_cross_entropy(logits: jax.Array, teacher: jax.Array,
                       weights: jax.Array) -> jax.Array:
  """Weighted mean over tokens of -sum_v p_teacher(v) log p_student(v)."""
  p = jax.nn.softmax(teacher, axis=-1)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_token = -jnp.sum(p * log_q, axis=-1)
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)
