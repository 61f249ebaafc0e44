"""switchjax: Switch Transformer, GShard and later sparse MoE models in JAX / Flax NNX.

Notation, one meaning per letter, in every module's docstrings (shapes are
written `f32[G, S, E]`) and einsum strings:

  B  batch (sequences)               G  routing groups
  L  sequence length (Li encoder,    S  tokens per group
     Lt decoder)                     E  experts
  Q  attention query length          C  expert capacity (slots per expert and group)
  T  attention key/value length      K  experts chosen per token
  M  model dim (d_model)             H  FFN / expert hidden dim (d_ff)
  N  attention heads                 R  rows of a flattened matmul operand: the
  D  head dim (d_kv)                    G * C slots of one expert (expert_loop),
  V  vocabulary                         the G * S * K choices (dropless)
  J  key/value heads (grouped-query) X  devices the 'expert' axes span

Modules, top to bottom (each imports only modules below it):

  model            T5-style encoder-decoder / decoder-only, dense or MoE FFNs
                   (attention: relative bias or RoPE, grouped-query, windows)
  soft_moe         Soft MoE: slots mixed from every token, no routing (encoders)
  shared_experts   DeepSeekMoE: a MoeLayer plus always-on shared experts
  moe              Router and MoeLayer: route, dispatch, experts, combine
  hash_router      hash routing's fixed token-id -> expert table (no parameters)
  loss_free        loss-free balancing: bias-corrected top-K, the bias's update
  experts          Experts (stacked [E, M, H] weights) and the dense MlpBlock
  expert_parallel  experts split over the mesh: GSPMD constraints, shard_map
  dropless         no-capacity grouped matmuls (ragged_dot)
  expert_loop      the experts one at a time, hand-written backward (CPU)
  ffn              FFN init, activation and dropout mask shared by all of these
  dispatch         group_tokens, dispatch/combine (gather or one-hot einsum)
  routing          pure functions: router logits -> Routing
"""
