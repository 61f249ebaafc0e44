"""The config schema: every key of `config_base.base_config()`, its kind and range.

`SCHEMA` maps each dotted key to a `Spec` (int, float, bool, str, or a
choice read from the module that owns the choices); `check_values` refuses,
in one `ConfigError` line naming the keys, any value outside its kind or
range. What keys say together (K <= E, group sizes, span lengths, the mesh)
is `switchjax.validate`'s part.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional

from flax import traverse_util
import ml_collections

from switchjax import config_base
from switchjax import dispatch
from switchjax import expert_parallel
from switchjax import experts
from switchjax import faults
from switchjax import ffn
from switchjax import loss_free
from switchjax import model
from switchjax import moe
from switchjax import optim
from switchjax import routing


class ConfigError(ValueError):
  """A config or workdir that cannot run."""


def _plain(tree: Any) -> Any:
  if isinstance(tree, ml_collections.ConfigDict):
    return tree.to_dict()
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any],
            prefix: str = "") -> dict[str, Any]:
  """Dotted key -> value of a (nested) ConfigDict or dict; empty sections vanish."""
  flat = traverse_util.flatten_dict(_plain(config), sep=".")
  return {prefix + key: value for key, value in flat.items()}


# ---------------------------------------------------------------------------
# The schema: every key's kind and range.

INT_MAX = 2**31 - 1  # sizes and counts end up in int32 shapes and indices
# jax.random.key(seed + 2) (train's rng streams) keeps only 32 bits with x64
# off: seed 2**32 would repeat seed 0.
SEED_MAX = 2**32 - 3


@dataclasses.dataclass(frozen=True)
class Spec:
  """What one key may hold.

  kind: 'int', 'float', 'bool', 'str' or 'choice'. Numbers lie in
  [low, high] (low_open / high_open make that end open; None: unbounded);
  floats must be finite and ints may not be bools or floats. `special`
  values are accepted besides the range or choices, `special_doc` says what
  they mean. 'str' with nonempty=True refuses ''.
  """
  kind: str
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  choices: tuple[str, ...] = ()
  special: tuple[Any, ...] = ()
  special_doc: str = ""
  nonempty: bool = False
  what: str = ""  # a 'str' key's description in messages

  def accepts(self, value: Any) -> bool:
    if self.special and _same(value, self.special):
      return True
    if self.kind == "bool":
      return isinstance(value, bool)
    if self.kind in ("str", "choice"):
      if not isinstance(value, str):
        return False
      if self.kind == "choice":
        return value in self.choices
      return bool(value) or not self.nonempty
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return False
    if self.kind == "int" and not isinstance(value, numbers.Integral):
      return False
    if self.kind == "float" and not (abs(value) < 2**1024  # no float
                                     and math.isfinite(value)):
      return False
    if self.low is not None and not (
        value > self.low if self.low_open else value >= self.low):
      return False
    return self.high is None or (
        value < self.high if self.high_open else value <= self.high)

  def describe(self, value: Any = None) -> str:
    """What the key may hold; `value`, if given, picks what to stress."""
    if self.kind == "bool":
      text = "true or false"
    elif self.kind == "choice":
      text = "one of " + ", ".join(repr(c) for c in self.choices)
    elif self.kind == "str":
      text = self.what or ("a non-empty string" if self.nonempty
                           else "a string")
    else:
      text = {"int": "an int", "float": "a finite number"}[self.kind]
      low, high = _num(self.low), _num(self.high)
      if (self.high == INT_MAX and not (isinstance(value, numbers.Real)
                                        and value > INT_MAX)):
        high = None  # the int32 bound only where it is the problem
      if self.low is not None and high is not None:
        text += (f" in {'(' if self.low_open else '['}{low}, {high}"
                 f"{')' if self.high_open else ']'}")
      elif self.low is not None:
        text += f" {'>' if self.low_open else '>='} {low}"
      elif high is not None:
        text += f" {'<' if self.high_open else '<='} {high}"
    if self.special:
      values = " or ".join(repr(s) for s in self.special)
      if self.kind == "choice" and "" not in self.special:  # an old name
        text = f"{text} (or {values}, {self.special_doc})"
      else:
        text = f"{values} ({self.special_doc}) or {text}"
    return text


def _same(value: Any, specials: tuple[Any, ...]) -> bool:
  """value is one of specials, of the same type (True is not 1)."""
  return any(type(value) is type(s) and value == s for s in specials)


def _num(x: Optional[float]) -> Optional[str]:
  """2**31 - 1 rather than 2147483647, 0 rather than 0.0."""
  if isinstance(x, float):
    return f"{x:g}"
  for k in range(1, 4):  # of INT_MAX, SEED_MAX, 2**32 - 1
    if isinstance(x, int) and x >= 2**16 and (x + k) & (x + k - 1) == 0:
      return f"2**{(x + k).bit_length() - 1} - {k}"
  return None if x is None else repr(x)


def Int(low: int = 1, high: int = INT_MAX, **kw) -> Spec:  # pylint: disable=invalid-name
  return Spec("int", low, high, **kw)


def Float(low: Optional[float] = 0.0, high: Optional[float] = None,  # pylint: disable=invalid-name
          **kw) -> Spec:
  return Spec("float", low, high, **kw)


def Choice(choices, **kw) -> Spec:  # pylint: disable=invalid-name
  return Spec("choice", choices=tuple(choices), **kw)


BOOL = Spec("bool")
STR = Spec("str")
RATE = Float(0.0, 1.0, high_open=True)  # dropout, jitter, smoothing, betas
POSITIVE = Float(0.0, low_open=True)
_ROUTER_OVERRIDE = Choice(routing.ROUTERS, special=("",),
                          special_doc="same as moe.router")
_MESH_AXIS = Int(1, special=(-1,), special_doc="the devices left over")

SCHEMA: dict[str, Spec] = {
    "seed": Int(0, SEED_MAX),
    # model
    "model.arch": Choice(model.ARCHS),
    "model.vocab_size": Int(1),  # replaced by the vocabulary's
    "model.d_model": Int(1),
    "model.num_heads": Int(1),
    "model.head_dim": Int(1),
    "model.d_ff": Int(1),
    "model.num_encoder_layers": Int(0),  # >= 1 in an encoder-decoder
    "model.num_decoder_layers": Int(1),
    "model.activation": Choice(ffn.ACTIVATIONS),
    "model.dropout_rate": RATE,
    "model.tie_embeddings": BOOL,
    "model.separate_encoder_embedding": BOOL,  # encoder_decoder only
    # attention.relative_position_bucket: see _check_model for how the two go
    # together (exact buckets must exist and max_distance lie beyond them).
    "model.position_embedding": Choice(model.POSITION_EMBEDDINGS),
    "model.relative_attention_num_buckets": Int(2),
    "model.relative_attention_max_distance": Int(2),
    "model.rope_theta": POSITIVE,
    # divides num_heads: _check_model
    "model.num_kv_heads": Int(1, special=(0,), special_doc="model.num_heads"),
    "model.attention_window": Int(1, special=(0,), special_doc="no window"),
    "model.norm_epsilon": POSITIVE,
    "model.dtype": Choice(model.DTYPES),
    "model.init_scale": POSITIVE,
    "model.remat": Choice(model.REMATS),
    # moe
    "moe.num_experts": Int(0),  # 0 = dense
    "moe.sparse_every": Int(1),
    "moe.sparse_offset": Int(0, special=(-1,), special_doc="sparse_every - 1"),
    "moe.router": Choice(routing.ROUTERS),
    "moe.encoder_router": _ROUTER_OVERRIDE,
    "moe.decoder_router": _ROUTER_OVERRIDE,
    "moe.num_selected": Int(1),  # <= num_experts: _check_moe
    "moe.train_capacity_factor": POSITIVE,
    "moe.eval_capacity_factor": POSITIVE,
    "moe.min_capacity": Int(1),
    "moe.group_size": Int(1, special=(0,), special_doc="one group per sequence"),
    "moe.expert_capacity": Int(0),  # 0 = from the capacity factor
    "moe.aux_loss_coef": Float(0.0),
    "moe.z_loss_coef": Float(0.0),
    "moe.router_jitter": RATE,  # U(1 - eps, 1 + eps) stays positive
    "moe.router_dtype": Choice(moe.ROUTER_DTYPES),
    "moe.router_init_std": Float(0.0),
    "moe.second_expert_policy": Choice(routing.SECOND_EXPERT_POLICIES),
    "moe.normalize_weights": BOOL,
    "moe.slots_per_expert": Int(1),
    "moe.soft_normalize": BOOL,
    "moe.batch_prioritized": BOOL,
    "moe.expert_dropout": RATE,
    "moe.d_ff": Int(1, special=(-1,), special_doc="model.d_ff"),
    "moe.expert_granularity": Int(1),  # divides the expert d_ff: _check_moe
    "moe.num_shared_experts": Int(0),  # < m x K: _check_moe
    "moe.first_dense_layers": Int(0),
    "moe.score_func": Choice(loss_free.SCORE_FUNCS),
    "moe.bias_update_rate": Float(0.0),
    "moe.routed_scaling_factor": POSITIVE,
    "moe.dispatch": Choice(dispatch.DISPATCHES, special=tuple(dispatch.ALIASES),
                           special_doc="the old name of 'gather'"),
    "moe.expert_impl": Choice(experts.EXPERT_IMPLS),
    "moe.expert_parallel": Choice(expert_parallel.PATHS),
    # mesh: at most one -1, product = devices: partitioning.check_mesh
    "mesh.data": _MESH_AXIS,
    "mesh.expert": _MESH_AXIS,
    "mesh.model": _MESH_AXIS,
    # data
    "data.name": Spec("str", nonempty=True),
    "data.data_dir": STR,
    "data.vocab_path": STR,
    # Span corruption: raw examples of >= 2 tokens (one noise, one not) + eos.
    "data.inputs_length": Int(3),
    "data.targets_length": Int(1),  # long enough: _check_span_corruption
    "data.noise_density": Float(0.0, 1.0, low_open=True, high_open=True),
    "data.mean_noise_span_length": Float(1.0),
    "data.seq_length": Int(1),
    "data.shuffle_seed": Int(0, 2**32 - 1),
    "data.exact_match_examples": Int(0),  # SeedSequence -> grain's uint32
    "data.train_examples": Int(0),
    # train
    "train.num_steps": Int(1),
    "train.batch_size": Int(1),
    "train.optimizer": Choice(optim.OPTIMIZERS),
    "train.adafactor_decay_rate": Float(0.0, 1.0, low_open=True),
    "train.adafactor_momentum": RATE,
    "train.adam_b1": RATE,
    "train.adam_b2": RATE,
    "train.adam_eps": POSITIVE,  # 0 divides 0 by 0 where a gradient is 0
    "train.learning_rate": POSITIVE,
    "train.schedule": Choice(optim.SCHEDULES),
    "train.warmup_steps": Int(0),  # rsqrt: >= 1; cosine: < num_steps
    "train.weight_decay": Float(0.0),
    "train.grad_clip": Float(0.0),  # 0 = off
    "train.label_smoothing": RATE,
    "train.logits_z_loss": Float(0.0),
    "train.log_every": Int(1),
    "train.eval_every": Int(1),
    "train.eval_steps": Int(1, special=(0,),
                            special_doc="the whole validation split"),
    "train.checkpoint_every": Int(1),
    "train.max_to_keep": Int(1),
    "train.nan_policy": Choice(faults.NAN_POLICIES),
    "train.init_from": STR,
    "train.upcycle_from": STR,
    "train.freeze": STR,
    "train.distill_from": STR,
    "train.distill_alpha": Float(0.0, 1.0),
    "train.distill_init": BOOL,
}
# Every partitioning rule: mesh axes, comma-separated ('' = replicated);
# parsed by partitioning.rules_from_config.
_RULE = Spec("str", what="mesh axes, comma-separated (e.g. 'data,expert'; "
             "'' = replicated)")
SCHEMA.update({key: _RULE for key in flatten(config_base.base_config())
               if key.startswith("partitioning.rules.")})


# ---------------------------------------------------------------------------
# The per-key checks.


def check_keys(flat: dict[str, Any]) -> None:
  unknown = sorted(set(flat) - set(SCHEMA))
  if unknown:
    raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
  missing = sorted(set(SCHEMA) - set(flat))
  if missing:
    raise ConfigError(f"missing config keys: {', '.join(missing)} (start "
                      "experiment configs from config_base.base_config())")


def value_error(key: str, value: Any) -> str:
  """The one wording of a value outside its key's kind or range."""
  return f"{key} must be {SCHEMA[key].describe(value)}, got {value!r}"


def check_values(flat: dict[str, Any]) -> None:
  errors = [value_error(key, flat[key]) for key, spec in SCHEMA.items()
            if not spec.accepts(flat[key])]
  if errors:
    raise ConfigError("; ".join(errors))
