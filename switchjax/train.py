"""Training: state, jitted train/eval steps, the loop, checkpoints, metrics.

The model is Flax NNX, the steps are pure functions of pytrees (the NNX
functional API): `nnx.merge` the params into the graph inside `jax.jit`, so
shardings and orbax see plain pytrees. Training randomness (dropout, router
jitter, noisy gates) is reseeded from (seed, step) every step, which is what
makes a resumed run draw the same random numbers as one never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from switchjax import checkpoint as ckpt_lib
from switchjax import data as data_lib
from switchjax import faults
from switchjax import model as model_lib
from switchjax import optim
from switchjax import partitioning
from switchjax import preemption
from switchjax import validate
from switchjax import writers

RNG_STREAMS = ("dropout", "router")


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


def _router_metrics(aux: model_lib.ModelAux,
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


@dataclasses.dataclass
class Trainer:
  """Everything a run compiles once: graph, optimizer, shardings, steps."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_graphdef: Any
  eval_graphdef: Any
  rest: Any  # non-param model state (rng streams), reseeded every step
  tx: optax.GradientTransformation
  abstract_state: Any  # ShapeDtypeStructs with shardings
  state_shardings: Any

  def init_state(self) -> dict[str, Any]:
    init = jax.jit(_init_fn(self.config, self.tx),
                   out_shardings=self.state_shardings)
    return init()

  def train_step(self, state, batch):
    return self._jit_train(state, self.rest, batch)

  def eval_step(self, params, batch):
    return self._jit_eval(params, self.rest, batch)

  def __post_init__(self):
    c = self.config
    arch = c.model.arch
    base_key = jax.random.key(c.seed + 1)

    def loss_fn(model, batch):
      logits, aux = model(**model_inputs(batch, arch))
      loss, ce = cross_entropy(
          logits, batch["decoder_target_tokens"],
          batch["decoder_loss_weights"], c.train.label_smoothing,
          c.train.logits_z_loss)
      total = (loss + c.moe.aux_loss_coef * aux.aux_loss
               + c.moe.z_loss_coef * aux.z_loss)
      return total, (ce, aux)

    def train_step(state, rest, batch):
      model = nnx.merge(self.train_graphdef, state["params"], rest)
      step_key = jax.random.fold_in(base_key, state["step"])
      nnx.reseed(model, **{s: jax.random.fold_in(step_key, i)
                           for i, s in enumerate(RNG_STREAMS)})
      grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
      (total, (ce, aux)), grads = grad_fn(model, batch)
      updates, opt_state = self.tx.update(grads, state["opt_state"],
                                          state["params"])
      params = optax.apply_updates(state["params"], updates)
      grad_norm = optax.tree.norm(grads)
      param_norm = optax.tree.norm(params)
      # One flag for loss, gradients and the updated params: the host reads
      # it (faults.FiniteWatch) instead of every value.
      finite = (jnp.isfinite(total) & jnp.isfinite(grad_norm)
                & jnp.isfinite(param_norm))
      # A non-finite step leaves params and optimizer state as they were
      # (Adafactor's moments would keep a NaN forever); it still counts as a
      # step, so data and rng stay those of a run without the fault. Done
      # under either nan_policy (the select fuses into the update): 'stop'
      # differs only on the host, which stops at the first skipped step.
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state["params"])
      opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
      skipped = state["skipped_steps"] + (~finite).astype(jnp.int32)
      metrics = {"loss": ce["nll"], "total_loss": total,
                 "accuracy": ce["accuracy"],
                 "grad_norm": grad_norm, "param_norm": param_norm,
                 "skipped_steps": skipped, "finite": finite,
                 **_router_metrics(aux)}
      new_state = {"step": state["step"] + 1, "params": params,
                   "opt_state": opt_state, "skipped_steps": skipped}
      return new_state, metrics

    def eval_step(params, rest, batch):
      model = nnx.merge(self.eval_graphdef, params, rest)
      logits, aux = model(**model_inputs(batch, arch))
      _, ce = cross_entropy(logits, batch["decoder_target_tokens"],
                            batch["decoder_loss_weights"])
      return {"loss": ce["nll"], "accuracy": ce["accuracy"],
              **_router_metrics(aux, per_layer=True)}

    rep = partitioning.replicated(self.mesh)
    rules = partitioning.rules_from_config(c)
    batch_sh = partitioning.batch_sharding(self.mesh, rules)
    # Traced with the mesh and axis rules in context: the MoE layers read
    # them to place their groups and experts (switchjax/expert_parallel.py).
    self._jit_train = jax.jit(
        partitioning.in_mesh(train_step, self.mesh, rules),
        in_shardings=(self.state_shardings, rep, batch_sh),
        out_shardings=(self.state_shardings, rep),
        donate_argnums=(0,))
    self._jit_eval = jax.jit(
        partitioning.in_mesh(eval_step, self.mesh, rules),
        in_shardings=(self.state_shardings["params"], rep, batch_sh),
        out_shardings=rep)


def _make_rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, dropout=seed + 1, router=seed + 2)


def _init_fn(config, tx):
  def init():
    model = model_lib.build_model(config, rngs=_make_rngs(config.seed))
    params = nnx.state(model, nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params),
            # Steps whose update nan_policy='skip' dropped.
            "skipped_steps": jnp.zeros((), jnp.int32)}
  return init


def make_trainer(config: ml_collections.ConfigDict,
                 devices: Optional[Sequence[jax.Device]] = None) -> Trainer:
  """The Trainer of `config` on a mesh of `devices` (default: all devices)."""
  mesh = partitioning.make_mesh(config, devices)
  tx = optim.make_optimizer(config)
  abstract_model = nnx.eval_shape(
      lambda: model_lib.build_model(config, rngs=_make_rngs(config.seed)))
  train_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  abstract_model.eval()
  eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  # The non-param state (rng streams) is tiny; under jit XLA drops the
  # unused param initialisers, so this allocates no weights.
  rest = jax.jit(lambda: nnx.split(model_lib.build_model(
      config, rngs=_make_rngs(config.seed)), nnx.Param, ...)[2])()
  abstract_state = jax.eval_shape(_init_fn(config, tx))
  shardings = partitioning.state_shardings(
      abstract_state, mesh, partitioning.rules_from_config(config))
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
  return Trainer(config=config, mesh=mesh, train_graphdef=train_graphdef,
                 eval_graphdef=eval_graphdef, rest=rest, tx=tx,
                 abstract_state=abstract_state, state_shardings=shardings)


def _tokens_per_batch(config) -> int:
  d = config.data
  per_example = (d.inputs_length + d.targets_length
                 if config.model.arch == "encoder_decoder" else d.seq_length)
  return config.train.batch_size * per_example


def _global_batch(trainer: Trainer, local: dict[str, np.ndarray]):
  sharding = partitioning.batch_sharding(
      trainer.mesh, partitioning.rules_from_config(trainer.config))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def _mean_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
  rows = jax.device_get(rows)
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *rows)


def evaluate(trainer: Trainer, params, config) -> dict[str, Any]:
  """Mean metrics over train.eval_steps validation batches (a fresh pass)."""
  it = data_lib.make_iterator(
      config, "validation",
      batch_size=config.train.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  rows = [trainer.eval_step(params, _global_batch(trainer, next(it)))
          for _ in range(config.train.eval_steps)]
  return _mean_metrics(rows)


def _param_count_line(config) -> str:
  total, active = model_lib.param_counts(config)
  return f"parameters: {total:,} total, {active:,} active per token"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains config in workdir (resuming if it holds a run); returns a summary.

  Stops early, saving the step, on SIGTERM/SIGINT (summary["preempted"]
  names the signal). Refuses bad configs and workdirs with
  validate.ConfigError before writing anything; faults during the run raise
  faults.RunError (NonFiniteError, checkpoint.CheckpointError) in one line.
  """
  config = validate.prepare(config)  # fills vocab_size, checks everything
  is_main = jax.process_index() == 0
  validate.check_workdir(config, workdir, allow_config_change)
  trainer = make_trainer(config)
  # Checkpoints of another model are refused before anything is written.
  ckpt_lib.check_compatible(workdir, trainer.abstract_state)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    validate.write_config(config, workdir)
    print(f"mesh {dict(trainer.mesh.shape)}; {_param_count_line(config)}",
          flush=True)
  train_iter = data_lib.make_iterator(
      config, "train",
      batch_size=config.train.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  log = (lambda line: print(line, flush=True)) if is_main else None
  checkpointer = ckpt_lib.Checkpointer(
      workdir, max_to_keep=config.train.max_to_keep, log=log)
  latest, state = checkpointer.restore_latest(trainer.abstract_state,
                                              train_iter)
  if latest is not None:
    if is_main:
      print(f"resumed from {checkpointer.directory} at step {latest}",
            flush=True)
  else:
    state = trainer.init_state()
  start = int(jax.device_get(state["step"]))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_main:
    writers.truncate_metrics(metrics_path, after_step=start)
  writer = writers.MetricsWriter(workdir, total_steps=config.train.num_steps,
                                 first_step=start, enabled=is_main)
  t = config.train
  tokens = _tokens_per_batch(config)
  last_train, last_eval = {}, {}
  tick, tick_step = time.perf_counter(), start
  watch = faults.FiniteWatch(t.nan_policy, checkpointer.last_good_text)
  guard = preemption.PreemptionGuard()
  step, stopped_at = start, None
  try:
    with guard:
      for step in range(start + 1, t.num_steps + 1):
        batch = _global_batch(trainer, next(train_iter))
        state, metrics = trainer.train_step(state, batch)
        watch.push(step, metrics)  # checks the previous step meanwhile
        if step % t.log_every == 0 or step == t.num_steps:
          watch.check()  # never log a non-finite step
          metrics = jax.device_get(metrics)
          del metrics["finite"]
          now = time.perf_counter()
          metrics["tokens_per_sec"] = tokens * (step - tick_step) / (now - tick)
          # The optimizer's count leaves out steps nan_policy='skip' dropped.
          metrics["learning_rate"] = float(optim.learning_rate_schedule(
              config)(step - 1 - int(metrics["skipped_steps"])))
          tick, tick_step = now, step
          writer.write(step, metrics)
          last_train = metrics
        writer.advance(step)
        if step % t.eval_every == 0 or step == t.num_steps:
          watch.check()
          last_eval = evaluate(trainer, state["params"], config)
          writer.write(step, last_eval, split="eval")
          tick = time.perf_counter()  # eval time is not training throughput
        stop = guard.should_stop(step)
        if stop or step % t.checkpoint_every == 0 or step == t.num_steps:
          watch.check()  # never save non-finite params
          checkpointer.save(step, state, train_iter)
          tick = time.perf_counter()
        if stop:
          stopped_at = step
          break
  except OSError as e:
    writer.close(quiet=True)
    checkpointer.close()
    raise faults.io_failed(e, step, checkpointer.last_good_text()) from e
  except BaseException:
    writer.close(quiet=True)
    checkpointer.close()
    raise
  writer.close()
  checkpointer.close()
  summary = {
      "workdir": os.path.abspath(workdir),
      "steps": step,
      "train_loss": last_train.get("loss"),
      "eval_loss": last_eval.get("loss"),
      "tokens_per_sec": last_train.get("tokens_per_sec"),
      "preempted": guard.reason if stopped_at is not None else None,
  }
  if is_main:
    if stopped_at is not None:
      print(f"stopped by {guard.reason} after step {stopped_at} of "
            f"{t.num_steps}; saved checkpoint {stopped_at} in "
            f"{checkpointer.directory}; run the same command again to resume",
            flush=True)
    else:
      _print_summary(summary, checkpointer.directory)
  return summary


def _print_summary(summary: dict[str, Any], checkpoint_dir: str) -> None:
  def fmt(x):
    return "n/a" if x is None else f"{float(x):.4f}"
  print(f"done: {summary['steps']} steps; train loss {fmt(summary['train_loss'])}, "
        f"eval loss {fmt(summary['eval_loss'])}, "
        f"{fmt(summary['tokens_per_sec'])} tokens/s\n"
        f"  metrics:     {os.path.join(summary['workdir'], 'metrics.jsonl')}\n"
        f"  tensorboard: {os.path.join(summary['workdir'], 'tensorboard')}\n"
        f"  checkpoints: {checkpoint_dir}")
