"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE run starts from a dense one.

`train.upcycle_from=DENSE` builds the configured MoE model's step-0 params
from a trained dense model (a switchjax workdir's newest checkpoint, or a
Hugging Face directory: `init_from.open_source`):

- every parameter the two models share (attention, norms, relative position
  biases, embeddings, head, the FFNs of layers that stay dense) is copied;
- each sparse layer's experts are its dense FFN tiled over E:
  `<stack>/layers/<i>/mlp/experts/wi` f32[E, M, H] = E copies of
  `<stack>/layers/<i>/mlp/wi` f32[M, H] (and wi_0, wi_1, wo f32[E, H, M]);
- routers (`.../mlp/router/kernel` f32[M, E], `noise_kernel`) keep their
  fresh initialisation, so training breaks the experts' symmetry.

At step 0 every expert computes the dense FFN, so with combine weights that
sum to 1 over a token's experts and no token dropped the MoE model computes
the dense model's function (tests/test_init_from.py checks the logits).
"""
from __future__ import annotations

import re

from flax import nnx
import jax
import jax.numpy as jnp

from switchjax import init_from
from switchjax import partitioning

ConfigError = init_from.ConfigError
KEY = "train.upcycle_from"
EXPERT = re.compile(r"^(.*/mlp)/experts/([^/]+)$")
ROUTER = re.compile(r"/mlp/router/")


def dense_path(path: str) -> str:
  """The dense model's param a param of the MoE model comes from:
  '.../mlp/experts/wi' -> '.../mlp/wi'; others keep their path."""
  m = EXPERT.match(path)
  return f"{m[1]}/{m[2]}" if m else path


def _pick(path: str, fresh: jax.Array,
          arrays: dict[str, jax.Array]) -> jax.Array:
  if ROUTER.search(path):
    return fresh
  value = arrays[dense_path(path)].astype(fresh.dtype)
  if EXPERT.match(path):  # f32[M, H] -> f32[E, M, H]: every expert alike
    return jnp.broadcast_to(value[None], fresh.shape)
  return value


def start(path: str, abstract_params: nnx.State,
          mesh: jax.sharding.Mesh) -> init_from.Start:
  """The Start of an MoE model (abstract_params: the trainer's, with
  shardings) from the dense weights at `path`; ConfigError if they are not
  dense or differ in anything but the expert axis."""
  source = init_from.open_source(path, KEY)
  sparse = next((p for p in sorted(source.shapes)
                 if EXPERT.match(p) or ROUTER.search(p)), None)
  if sparse:
    raise ConfigError(f"{KEY}={path} is not a dense model (it has {sparse}); "
                      "upcycling starts from a run with moe.num_experts=0")
  # What the dense model must hold: the MoE model's params less the routers,
  # each expert stack less its leading E axis.
  wanted, names = {}, {}
  for p, (shape, dtype) in init_from.shapes_of(abstract_params).items():
    if ROUTER.search(p):
      continue
    if EXPERT.match(p):
      shape = shape[1:]
      names[dense_path(p)] = f"{dense_path(p)} (the experts of {p})"
    wanted[dense_path(p)] = (shape, dtype)
  init_from.check_fits(KEY, source, wanted, names)
  # Expert sources are read whole on every device and tiled in the init.
  targets = init_from.shardings_of(abstract_params)
  replicated = partitioning.replicated(mesh)
  shardings = {p: (replicated if p in names else targets[p]) for p in wanted}
  layers = len({EXPERT.match(p)[1] for p in targets if EXPERT.match(p)})
  return init_from.Start(
      source=source, shardings=shardings, pick=_pick,
      line=(f"upcycled from {source.describe()}: the experts of {layers} "
            "sparse layers copied from their dense FFN, routers fresh"))
