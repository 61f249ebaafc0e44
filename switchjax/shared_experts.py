"""DeepSeekMoE's shared experts (Dai et al. 2024): always-on experts beside the routed ones.

DeepSeekMoE makes two changes to a top-K MoE layer of E experts of width H,
both at equal compute:

- fine-grained experts (`moe.expert_granularity` m): m x E experts of width
  H / m, of which each token takes m x K (`model.routed_shape`,
  `model.expert_d_ff`: a config-level change, the layer is a `MoeLayer`);
- shared-expert isolation (`moe.num_shared_experts` s): s of those m x K are
  taken by every token, with no router and weight 1, and the router chooses
  the other m x K - s from the m x E routed experts.

`SharedExpertsMoeLayer` is the routed layer plus the s shared experts, kept
as one dense FFN of width s x H / m (s experts side by side compute exactly
that: transformers' DeepseekV2/V3 keep them the same way), added to the
routed output. DeepSeekMoE 16B: E = 16, K = 2, m = 4, s = 2 (64 routed
experts, 6 routed + 2 shared per token; experiments/deepseek_moe.py).
"""
from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from switchjax import experts as experts_lib
from switchjax import moe as moe_lib


class SharedExpertsMoeLayer(moe_lib.MoeLayer):
  """A MoeLayer whose output also gets `num_shared_experts` always-on experts.

  Params: MoeLayer's (router, experts: the routed ones) and shared_experts
  (wi f32[M, s * H], wo f32[s * H, M]), the same activation, init and
  expert dropout as the routed experts. Takes MoeLayer's arguments and
  `num_shared_experts` s >= 1.
  """

  def __init__(self, d_model: int, d_ff: int, *, num_shared_experts: int,
               rngs: nnx.Rngs, **kwargs):
    if num_shared_experts < 1:
      raise ValueError(f"num_shared_experts must be >= 1, got {num_shared_experts}.")
    super().__init__(d_model, d_ff, rngs=rngs, **kwargs)
    self.num_shared_experts = num_shared_experts
    self.shared_experts = experts_lib.MlpBlock(
        d_model, num_shared_experts * d_ff,
        activation=kwargs.get("activation", "relu"),
        dropout=kwargs.get("expert_dropout", 0.0),
        init_scale=kwargs.get("init_scale", 0.1), dtype=self.dtype,
        deterministic=kwargs.get("deterministic", False), rngs=rngs)

  def __call__(self, x: jax.Array, token_ids: Optional[jax.Array] = None
               ) -> tuple[jax.Array, moe_lib.MoeOutput]:
    """x[B, L, M] -> (routed + shared [B, L, M] in `dtype`, MoeOutput)."""
    y, out = super().__call__(x, token_ids)
    return y + self.shared_experts(x).astype(y.dtype), out
