"""Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2).

`moe.router=loss_free`: each token's scores s = sigmoid(logits) (or softmax,
`moe.score_func`) rank the experts after a per-expert bias b is added, and
the K best by s + b are chosen; the combine weights are the chosen s alone
(renormalised over the K when `moe.normalize_weights`, then times
`moe.routed_scaling_factor`: DeepSeek-V3's 2.5). The bias takes no gradient.
After every optimizer step the train step moves it by

    b_e <- b_e + rate * sign(mean_e' load_e' - load_e)

(`moe.bias_update_rate`, 0.001 in DeepSeek-V3), where load_e is the layer's
fraction of dispatched (token, expert) pairs in that step (the choices
themselves when dropless): overloaded experts become less attractive,
underloaded ones more. `moe.aux_loss_coef` > 0 adds DeepSeek-V3's
complementary balance loss: Switch's E * sum_e f_e P_e over each routing
group with P from the scores normalised over the experts, which is their
sequence-wise loss when each sequence is a group (`moe.group_size=0`).

The bias is a parameter of the router (`.../mlp/router/balance_bias`,
f32[E], replicated like the kernel): it is checkpointed, restored and
resumed with the rest of the state. Its gradient is zero (stop_gradient),
so every optimizer leaves it alone (its rank-1 shape also keeps weight
decay off it); only `update_biases` changes it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from switchjax import freeze
from switchjax import routing as routing_lib

ROUTER = "loss_free"
SCORE_FUNCS = ("sigmoid", "softmax")
BIAS = "balance_bias"


def scores(logits: jax.Array, score_func: str) -> jax.Array:
  """Router logits f32[G, S, E] -> per-expert scores f32[G, S, E]."""
  logits = logits.astype(jnp.float32)
  if score_func == "sigmoid":
    return jax.nn.sigmoid(logits)
  if score_func == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  raise ValueError(f"unknown score_func {score_func!r}; expected one of "
                   f"{SCORE_FUNCS}")


def topk(logits: jax.Array, bias: jax.Array, capacity: int,
         num_selected: int, *, score_func: str = "sigmoid",
         normalize_weights: bool = True,
         scaling: float = 1.0) -> routing_lib.Routing:
  """Bias-corrected top-K token choice (see the module doc).

  logits: f32[G, S, E]; bias: f32[E]. Choice k of every token claims slots
  before choice k + 1 of any token, as `routing.topk`.
  """
  s = scores(logits, score_func)
  biased = s + jax.lax.stop_gradient(bias.astype(jnp.float32))
  _, expert = jax.lax.top_k(biased, num_selected)  # [G, S, K]
  weight = jnp.take_along_axis(s, expert, axis=-1)
  if normalize_weights:
    weight = weight / (jnp.sum(weight, axis=-1, keepdims=True) + 1e-20)
  weight = weight * scaling
  # The balance loss's P: the scores as a distribution over the experts.
  probs = s / jnp.sum(s, axis=-1, keepdims=True)
  return routing_lib.token_choice_routing(
      probs, expert, weight, jnp.ones_like(expert, bool), capacity,
      aux_loss=routing_lib.switch_aux_loss(probs, expert))


def _layer_name(path: str) -> str:
  """'decoder/layers/3/mlp/router/balance_bias' -> 'decoder/layer_3'."""
  parts = path.split("/")
  return f"{parts[0]}/layer_{parts[2]}"


def _is_bias(path: str) -> bool:
  return path.endswith(f"/mlp/router/{BIAS}")


def _paths(params: Any) -> list[tuple[str, jax.Array]]:
  return [(freeze.param_path(p), x)
          for p, x in jax.tree_util.tree_leaves_with_path(params)]


def update_biases(params: Any, expert_load: jax.Array,
                  layer_names: tuple[str, ...], rate: float) -> Any:
  """params with every balance bias moved toward equal load (module doc).

  expert_load: f32[layers, E], one row per MoE layer in `layer_names`
  order (`model.ModelAux`).
  """
  row = {name: i for i, name in enumerate(layer_names)}

  def update(path, x):
    name = freeze.param_path(path)
    if not _is_bias(name):
      return x
    load = expert_load[row[_layer_name(name)]]
    return x + rate * jnp.sign(jnp.mean(load) - load).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(update, params)


def has_biases(params: Any) -> bool:
  return any(_is_bias(p) for p, _ in _paths(params))


def metrics(params: Any, expert_load: jax.Array) -> dict[str, jax.Array]:
  """The balancing's own metrics: the widest bias range over the layers
  (max_e b_e - min_e b_e) and the mean over layers of the load's max
  violation (max_e load_e / mean load - 1; Wang et al.'s MaxVio)."""
  ranges = [jnp.max(x) - jnp.min(x) for p, x in _paths(params) if _is_bias(p)]
  load = expert_load.astype(jnp.float32)
  violation = jnp.max(load, axis=-1) / jnp.mean(load, axis=-1) - 1.0
  return {"balance_bias_range": jnp.max(jnp.stack(ranges)),
          "load_max_violation": jnp.mean(violation)}
