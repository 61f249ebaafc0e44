"""The training objective: token cross-entropy, router losses, distillation.

Notation: see `switchjax/__init__.py`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from switchjax import distill
from switchjax import model as model_lib


def model_inputs(batch: dict[str, Any], arch: str) -> dict[str, Any]:
  """The model's keyword inputs from a batch (targets and weights removed)."""
  keys = (("encoder_input_tokens", "decoder_input_tokens")
          if arch == "encoder_decoder" else ("decoder_input_tokens",))
  return {k: batch[k] for k in keys}


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict[str, Any]]:
  """Weighted mean token cross-entropy, T5's logit z-loss added.

  logits f32[B, L, V], targets i32[B, L], weights f32[B, L].
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_p = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
  nll = -log_p
  if label_smoothing:
    mean_log_p = jnp.mean(logits, axis=-1) - log_z
    nll = (1 - label_smoothing) * nll - label_smoothing * mean_log_p
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  loss = jnp.sum(nll * weights) / denom
  logit_z = jnp.sum(log_z ** 2 * weights) / denom
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {"nll": jnp.sum(-log_p * weights) / denom,
             "accuracy": jnp.sum(correct * weights) / denom}
  return loss + z_loss * logit_z, metrics


def router_metrics(aux: model_lib.ModelAux,
                    per_layer: bool = False) -> dict[str, Any]:
  out = {"aux_loss": aux.aux_loss, "z_loss": aux.z_loss}
  if aux.metrics is None:
    out["dropped_fraction"] = jnp.zeros(())
    return out
  m = aux.metrics
  out["dropped_fraction"] = jnp.mean(m.dropped_fraction)
  out["router_confidence"] = jnp.mean(m.router_confidence)
  out["router_entropy"] = jnp.mean(m.router_entropy)
  if per_layer:
    out["layers"] = {
        name: {"dropped_fraction": m.dropped_fraction[i],
               "expert_load": m.expert_load[i]}
        for i, name in enumerate(aux.layer_names)}
  return out


def loss_fn(model, batch, config, teacher_logits=None):
  """The training objective: token cross-entropy plus the router losses;
  with a teacher's logits, (1 - alpha) of it and alpha of the soft one."""
  logits, aux = model(**model_inputs(batch, config.model.arch))
  loss, ce = cross_entropy(
      logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
      config.train.label_smoothing, config.train.logits_z_loss)
  if teacher_logits is not None:
    alpha = config.train.distill_alpha
    ce["distill_loss"] = distill.soft_cross_entropy(
        logits, teacher_logits, batch["decoder_loss_weights"])
    loss = (1 - alpha) * loss + alpha * ce["distill_loss"]
  total = (loss + config.moe.aux_loss_coef * aux.aux_loss
           + config.moe.z_loss_coef * aux.z_loss)
  return total, (ce, aux)
