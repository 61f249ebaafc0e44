"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

Each token goes to the expert its vocabulary id hashes to: a fixed,
uniformly random table id -> expert ("Random Hash", the paper's baseline
hash), the same for every layer's position and every step. Nothing is
learned, so there is no router parameter, no balancing loss and no z-loss;
the table balances ids, not tokens, so frequent ids load their experts (the
layer's `expert_load` shows by how much). It is the balancing baseline for
the learned routers: `moe.router=hash`.
"""
from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

ROUTER = "hash"
TABLE_SEED = 0  # one fixed table per (vocabulary size, E), as the paper's


@functools.lru_cache(maxsize=16)
def expert_table(vocab_size: int, num_experts: int) -> np.ndarray:
  """i32[V]: the expert of every id, uniform over E, fixed by TABLE_SEED."""
  rng = np.random.default_rng(TABLE_SEED)
  return rng.integers(0, num_experts, vocab_size).astype(np.int32)


class HashRouter(nnx.Module):
  """Token ids i32[G, S] -> expert index i32[G, S]; no parameters."""

  def __init__(self, vocab_size: int, num_experts: int):
    if vocab_size < 1:
      raise ValueError(f"router 'hash' needs the vocabulary size, got "
                       f"{vocab_size}.")
    self.vocab_size = vocab_size
    self.num_experts = num_experts

  def __call__(self, token_ids: jax.Array) -> jax.Array:
    table = jnp.asarray(expert_table(self.vocab_size, self.num_experts))
    return jnp.take(table, token_ids, axis=0)
