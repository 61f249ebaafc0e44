"""Training: state, jitted train/eval steps, the loop, checkpoints, metrics.

The model is Flax NNX, the steps are pure functions of pytrees (the NNX
functional API): `nnx.merge` the params into the graph inside `jax.jit`, so
shardings and orbax see plain pytrees. Training randomness (dropout, router
jitter, noisy gates) is reseeded from (seed, step) every step, which is what
makes a resumed run draw the same random numbers as one never stopped.
"""
from __future__ import annotations

import dataclasses
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
from switchjax import distill
from switchjax import exact_match as exact_match_lib
from switchjax import faults
from switchjax import freeze
from switchjax import init_from
from switchjax import loss_free
from switchjax import losses
from switchjax import memory_plan
from switchjax import model as model_lib
from switchjax import optim
from switchjax import partitioning
from switchjax import preemption
from switchjax import upcycle
from switchjax import validate
from switchjax import workdir_lock
from switchjax import writers

RNG_STREAMS = ("dropout", "router")


def _train_step(state, rng_state, batch, *, config, graphdef, tx, base_key,
                teacher=None, teacher_params=None):
  """One optimizer step on `batch`: (new state, metrics)."""
  teacher_logits = None if teacher is None else distill.teacher_logits(
      teacher, teacher_params, losses.model_inputs(batch, config.model.arch))
  model = nnx.merge(graphdef, state["params"], rng_state)
  step_key = jax.random.fold_in(base_key, state["step"])
  nnx.reseed(model, **{s: jax.random.fold_in(step_key, i)
                       for i, s in enumerate(RNG_STREAMS)})
  grad_fn = nnx.value_and_grad(
      lambda model, batch: losses.loss_fn(model, batch, config, teacher_logits),
      has_aux=True)
  (total, (ce, aux)), grads = grad_fn(model, batch)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  balance = {}
  if aux.metrics is not None and loss_free.has_biases(params):
    # Loss-free balancing: the bias steps toward equal load, outside the
    # gradient, from this step's loads.
    params = loss_free.update_biases(params, aux.metrics.expert_load,
                                     aux.layer_names,
                                     config.moe.bias_update_rate)
    balance = loss_free.metrics(params, aux.metrics.expert_load)
  # Of the parameters that train: frozen ones' gradients are then unused.
  grad_norm = optax.tree.norm(freeze.trainable(grads, config.train.freeze))
  param_norm = optax.tree.norm(params)
  # One flag for loss, gradients and the updated params: the host reads it
  # (faults.FiniteWatch) instead of every value.
  finite = (jnp.isfinite(total) & jnp.isfinite(grad_norm)
            & jnp.isfinite(param_norm))
  # A non-finite step leaves params and optimizer state as they were
  # (Adafactor's moments would keep a NaN forever); it still counts as a
  # step, so data and rng stay those of a run without the fault. Done under
  # either nan_policy (the select fuses into the update): 'stop' differs
  # only on the host, which stops at the first skipped step.
  keep = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep, params, state["params"])
  opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
  skipped = state["skipped_steps"] + (~finite).astype(jnp.int32)
  metrics = {"loss": ce["nll"], "total_loss": total,
             "accuracy": ce["accuracy"],
             "grad_norm": grad_norm, "param_norm": param_norm,
             "skipped_steps": skipped, "finite": finite,
             **{k: ce[k] for k in ("distill_loss",) if k in ce},
             **losses.router_metrics(aux), **balance}
  new_state = {"step": state["step"] + 1, "params": params,
               "opt_state": opt_state, "skipped_steps": skipped}
  return new_state, metrics


def _eval_step(params, rng_state, batch, *, config, graphdef):
  """Validation metrics of one batch (no router losses in the loss)."""
  model = nnx.merge(graphdef, params, rng_state)
  logits, aux = model(**losses.model_inputs(batch, config.model.arch))
  _, ce = losses.cross_entropy(logits, batch["decoder_target_tokens"],
                               batch["decoder_loss_weights"])
  return {"loss": ce["nll"], "accuracy": ce["accuracy"],
          "tokens": jnp.sum(batch["decoder_loss_weights"]),
          **losses.router_metrics(aux, per_layer=True)}


@dataclasses.dataclass
class Trainer:
  """Everything a run compiles once: graph, optimizer, shardings, steps."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_graphdef: Any
  eval_graphdef: Any
  # The non-param model state: the rng streams, reseeded every step.
  rng_state: Any
  tx: optax.GradientTransformation
  abstract_state: Any  # ShapeDtypeStructs with shardings
  state_shardings: Any
  # The batch's: leading axis over the 'batch' rule's mesh axes.
  batch_sharding: jax.sharding.NamedSharding = dataclasses.field(
      init=False, repr=False)
  # The per-step rng streams fold the step into this key. It is an argument
  # of the compiled step, not a constant in it, so runs that differ only in
  # the seed share one compilation (the persistent cache of a sweep).
  base_key: jax.Array = dataclasses.field(init=False, repr=False)
  teacher: Optional[distill.Teacher] = None  # train.distill_from

  def init_state(self, weights: Optional[init_from.Start] = None
                 ) -> dict[str, Any]:
    """A fresh train state at step 0; its params from `weights` where given
    (the optimizer state is fresh either way)."""
    init = jax.jit(_init_fn(self.config, self.tx, weights),
                   out_shardings=self.state_shardings)
    return init() if weights is None else init(weights.read())

  def train_step(self, state, batch):
    teacher = () if self.teacher is None else (self.teacher.params,)
    return self._jit_train(state, self.rng_state, self.base_key, batch,
                           *teacher)

  def eval_step(self, params, batch):
    return self._jit_eval(params, self.rng_state, batch)

  def __post_init__(self):
    c = self.config
    rep = partitioning.replicated(self.mesh)
    # Made under jit: a global array, which a multi-process step accepts.
    self.base_key = jax.jit(lambda: jax.random.key(c.seed + 1),
                            out_shardings=rep)()

    def train_step(state, rng_state, base_key, batch, teacher_params=None):
      return _train_step(state, rng_state, batch, config=c,
                         graphdef=self.train_graphdef, tx=self.tx,
                         base_key=base_key, teacher=self.teacher,
                         teacher_params=teacher_params)

    def eval_step(params, rng_state, batch):
      return _eval_step(params, rng_state, batch, config=c,
                        graphdef=self.eval_graphdef)

    rules = partitioning.rules_from_config(c)
    self.batch_sharding = partitioning.batch_sharding(self.mesh, rules)
    # Traced with the mesh and axis rules in context: the MoE layers read
    # them to place their groups and experts (switchjax/expert_parallel.py).
    self._jit_train = jax.jit(
        partitioning.in_mesh(train_step, self.mesh, rules),
        # The teacher's params (distillation) are a fifth argument.
        in_shardings=(self.state_shardings, rep, rep, self.batch_sharding,
                      *((rep,) if self.teacher is not None else ())),
        out_shardings=(self.state_shardings, rep),
        donate_argnums=(0,))
    self._jit_eval = jax.jit(
        partitioning.in_mesh(eval_step, self.mesh, rules),
        in_shardings=(self.state_shardings["params"], rep,
                      self.batch_sharding),
        out_shardings=rep)


def _make_rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, dropout=seed + 1, router=seed + 2)


def _init_fn(config, tx, weights: Optional[init_from.Start] = None):
  def init(*source_arrays):
    model = model_lib.build_model(config, rngs=_make_rngs(config.seed))
    params = nnx.state(model, nnx.Param)
    if weights is not None:  # XLA drops the fresh values it replaces
      params = weights.params(params, *source_arrays)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params),
            # Steps whose update nan_policy='skip' dropped.
            "skipped_steps": jnp.zeros((), jnp.int32)}
  return init


def abstract_train_state(config: ml_collections.ConfigDict,
                         tx: Optional[optax.GradientTransformation] = None
                         ) -> dict[str, Any]:
  """The train state's ShapeDtypeStructs (no shardings), allocating nothing."""
  tx = optim.make_optimizer(config) if tx is None else tx
  return jax.eval_shape(_init_fn(config, tx))


def check_memory(config: ml_collections.ConfigDict) -> None:
  """Refuses (validate.ConfigError) a run whose step cannot fit its devices,
  from abstract shapes (switchjax.memory_plan): nothing is allocated."""
  problem = memory_plan.refusal(config, abstract_train_state(config),
                                jax.devices())
  if problem:
    raise validate.ConfigError(problem)


def make_trainer(config: ml_collections.ConfigDict,
                 devices: Optional[Sequence[jax.Device]] = None,
                 teacher: bool = False) -> Trainer:
  """The Trainer of `config` on a mesh of `devices` (default: all devices);
  `teacher`: with train.distill_from's teacher loaded (for training)."""
  mesh = partitioning.make_mesh(config, devices)
  tx = optim.make_optimizer(config)
  abstract_model = nnx.eval_shape(
      lambda: model_lib.build_model(config, rngs=_make_rngs(config.seed)))
  train_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  abstract_model.eval()
  eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  # The non-param state (rng streams) is tiny; under jit XLA drops the
  # unused param initialisers, so this allocates no weights.
  rng_state = jax.jit(lambda: nnx.split(model_lib.build_model(
      config, rngs=_make_rngs(config.seed)), nnx.Param, ...)[2])()
  abstract_state = abstract_train_state(config, tx)
  shardings = partitioning.state_shardings(
      abstract_state, mesh, partitioning.rules_from_config(config),
      config.train.freeze)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
  return Trainer(config=config, mesh=mesh, train_graphdef=train_graphdef,
                 eval_graphdef=eval_graphdef, rng_state=rng_state, tx=tx,
                 abstract_state=abstract_state, state_shardings=shardings,
                 teacher=distill.load(config.train.distill_from, config, mesh)
                 if teacher and config.train.distill_from else None)


def _tokens_per_batch(config) -> int:
  d = config.data
  per_example = (d.inputs_length + d.targets_length
                 if config.model.arch == "encoder_decoder" else d.seq_length)
  return config.train.batch_size * per_example


def _global_batch(trainer: Trainer, local: dict[str, np.ndarray]):
  """The global batch of this process's rows `local` (on trainer's mesh)."""
  return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
          for k, v in local.items()}


def _mean_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-batch eval metrics -> their means weighted by each batch's target
  tokens (a padded batch counts by its real tokens), and the token total."""
  rows = jax.device_get(rows)
  tokens = np.array([r["tokens"] for r in rows], np.float64)
  weights = tokens / tokens.sum()
  mean = jax.tree.map(
      lambda *xs: np.tensordot(weights, np.stack(xs), axes=1).astype(
          np.asarray(xs[0]).dtype), *rows)
  mean["tokens"] = float(tokens.sum())
  return mean


def eval_batches(config) -> int:
  """train.eval_steps, or for 0 the batches of one whole validation pass."""
  if config.train.eval_steps:
    return config.train.eval_steps
  n = data_lib.num_batches(
      config, "validation",
      batch_size=config.train.batch_size // jax.process_count(),
      process_count=jax.process_count())
  if n < 1:
    raise ValueError("train.eval_steps=0: the validation split holds less "
                     "than one batch per process")
  return n


def evaluate(trainer: Trainer, params, config) -> dict[str, Any]:
  """Token-weighted mean metrics over `eval_batches` validation batches
  (a fresh pass: the same batches every time, and for every seed)."""
  it = data_lib.make_iterator(
      config, "validation",
      batch_size=config.train.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  rows = [trainer.eval_step(params, _global_batch(trainer, next(it)))
          for _ in range(eval_batches(config))]
  out = _mean_metrics(rows)
  # A task: exact match by decoding (one process: its arrays are all here).
  if (config.data.exact_match_examples and jax.process_count() == 1
      and data_lib.is_task_data(config)):
    model = nnx.merge(trainer.eval_graphdef, params, trainer.rng_state)
    out["exact_match"] = exact_match_lib.exact_match(
        model, config, "validation", config.data.exact_match_examples
    )["exact_match"]
  return out


def _param_count_line(config, trainer: Trainer) -> str:
  total, active = model_lib.param_counts(config)
  line = f"parameters: {total:,} total, {active:,} active per token"
  if config.train.freeze:  # checked by _setup_run: counted here
    trains, _ = freeze.check(trainer.abstract_state["params"],
                             config.train.freeze)
    line += (f"; {trains:,} train, {total - trains:,} frozen "
             f"(train.freeze={config.train.freeze!r})")
  return line


def check_freeze(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(parameters that train, all parameters) under train.freeze, or
  validate.ConfigError if it selects none or all of them."""
  params = nnx.state(nnx.eval_shape(lambda: model_lib.build_model(
      config, rngs=_make_rngs(config.seed))), nnx.Param)
  try:
    return freeze.check(params, config.train.freeze)
  except freeze.FreezeError as e:
    raise validate.ConfigError(str(e)) from None


def _is_time(step: int, every: int, last: int) -> bool:
  """Whether `step` is one to log / evaluate / save at: every N-th and the last."""
  return step % every == 0 or step == last


@dataclasses.dataclass
class _Run:
  """A run's pieces (from `_setup_run`) and what its loop leaves behind."""
  config: ml_collections.ConfigDict
  workdir: str
  is_main: bool
  trainer: Trainer
  state: Any  # the train state, replaced every step
  train_iter: Any  # the train data iterator, saved with the state
  checkpointer: ckpt_lib.Checkpointer
  writer: writers.MetricsWriter
  watch: faults.FiniteWatch
  guard: preemption.PreemptionGuard
  start: int  # the step restored (0 for a new run)
  step: int  # the last step begun (start before the first)
  stopped_at: Optional[int] = None  # the step a signal stopped the run after
  last_train: dict[str, Any] = dataclasses.field(default_factory=dict)
  last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
  lock: Optional[workdir_lock.WorkdirLock] = None  # process 0's

  def close(self, quiet: bool = False) -> None:
    try:
      self.writer.close(quiet=quiet)
      self.checkpointer.close()
    finally:
      if self.lock is not None:
        self.lock.release()


def _setup_run(config: ml_collections.ConfigDict, workdir: str,
               allow_config_change: bool, memory_check: bool = True) -> _Run:
  """Checks config and workdir, builds the trainer, restores or inits the
  state, and opens the data, checkpoints and metrics of a run."""
  if memory_check:  # before the data checks: a run that cannot fit, first
    validate.check_config(config)
  if config.train.freeze:  # before the optimizer is built from it
    check_freeze(config)
  if memory_check:
    check_memory(config)
  config = validate.prepare(config)  # fills vocab_size, checks everything
  validate.check_workdir(config, workdir, allow_config_change)
  trainer = make_trainer(config, teacher=True)
  # Checkpoints of another model are refused before anything is written.
  ckpt_lib.check_compatible(workdir, trainer.abstract_state)
  weights = _start_weights(config, workdir, trainer)  # or refuses them
  os.makedirs(workdir, exist_ok=True)
  lock = workdir_lock.acquire_for_run(workdir)  # before anything is written
  try:
    return _open_run(config, workdir, trainer, lock, weights)
  except BaseException:
    if lock is not None:
      lock.release()
    raise


def _start_weights(config: ml_collections.ConfigDict, workdir: str,
                   trainer: Trainer) -> Optional[init_from.Start]:
  """The weights a new run starts from (train.init_from / upcycle_from), or
  None: fresh ones, or a run with checkpoints, which resumes from them."""
  t = config.train
  if not (t.init_from or t.upcycle_from or t.distill_init) or (
      ckpt_lib.steps_on_disk(workdir)):
    return None
  params = trainer.abstract_state["params"]
  if t.distill_init:
    return distill.init_start(t.distill_from, params, trainer.mesh)
  if t.init_from:
    return init_from.start(t.init_from, params)
  return upcycle.start(t.upcycle_from, params, trainer.mesh)


def _open_run(config: ml_collections.ConfigDict, workdir: str,
              trainer: Trainer, lock: Optional[workdir_lock.WorkdirLock],
              weights: Optional[init_from.Start] = None) -> _Run:
  """The run in a workdir this process (or process 0) holds the lock of;
  a new one starts from `weights` where given."""
  is_main = jax.process_index() == 0
  if is_main:
    validate.write_config(config, workdir)
    print(f"mesh {dict(trainer.mesh.shape)}; {_param_count_line(config, trainer)}",
          flush=True)
    if trainer.teacher is not None:
      print(trainer.teacher.line, flush=True)
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
    if weights is not None and is_main:
      print(weights.line, flush=True)
    state = trainer.init_state(weights)
  start = int(jax.device_get(state["step"]))
  if is_main:
    writers.truncate_metrics(os.path.join(workdir, "metrics.jsonl"),
                             after_step=start)
  writer = writers.MetricsWriter(workdir, total_steps=config.train.num_steps,
                                 first_step=start, enabled=is_main)
  return _Run(
      config=config, workdir=workdir, is_main=is_main, trainer=trainer,
      state=state, train_iter=train_iter, checkpointer=checkpointer,
      writer=writer,
      watch=faults.FiniteWatch(config.train.nan_policy,
                               checkpointer.last_good_text),
      guard=preemption.PreemptionGuard(), start=start, step=start,
      lock=lock)


class _Throughput:
  """Training tokens per second between logged steps; eval and saves excluded."""

  def __init__(self, tokens_per_step: int, step: int):
    self.tokens_per_step = tokens_per_step
    self.tick, self.tick_step = time.perf_counter(), step

  def rate(self, step: int) -> float:
    """Tokens per second since the last `rate` (or start); restarts the clock."""
    now = time.perf_counter()
    rate = self.tokens_per_step * (step - self.tick_step) / (now - self.tick)
    self.tick, self.tick_step = now, step
    return rate

  def skip(self) -> None:
    """Leaves the time since the last call out (an eval or a save ran)."""
    self.tick = time.perf_counter()


def _logged_metrics(config, step: int, metrics: dict[str, Any],
                    clock: _Throughput) -> dict[str, Any]:
  """A step's metrics as logged: on the host, with throughput and rate."""
  metrics = jax.device_get(metrics)
  del metrics["finite"]
  metrics["tokens_per_sec"] = clock.rate(step)
  # The optimizer's count leaves out steps nan_policy='skip' dropped.
  metrics["learning_rate"] = float(optim.learning_rate_schedule(
      config)(step - 1 - int(metrics["skipped_steps"])))
  return metrics


def _train_loop(run: _Run) -> None:
  """Steps from run.start to train.num_steps, or until a signal stops it.

  Logs, evaluates and saves on their schedules (and at the last step);
  never logs, evaluates or saves after a non-finite step (run.watch).
  """
  config, trainer, t = run.config, run.trainer, run.config.train
  clock = _Throughput(_tokens_per_batch(config), run.start)
  with run.guard:
    for step in range(run.start + 1, t.num_steps + 1):
      run.step = step
      batch = _global_batch(trainer, next(run.train_iter))
      run.state, metrics = trainer.train_step(run.state, batch)
      run.watch.push(step, metrics)  # checks the previous step meanwhile
      if _is_time(step, t.log_every, t.num_steps):
        run.watch.check()  # never log a non-finite step
        run.last_train = _logged_metrics(config, step, metrics, clock)
        run.writer.write(step, run.last_train)
      run.writer.advance(step)
      if _is_time(step, t.eval_every, t.num_steps):
        run.watch.check()
        run.last_eval = evaluate(trainer, run.state["params"], config)
        run.writer.write(step, run.last_eval, split="eval")
        clock.skip()  # eval time is not training throughput
      stop = run.guard.should_stop(step)
      if stop or _is_time(step, t.checkpoint_every, t.num_steps):
        run.watch.check()  # never save non-finite params
        run.checkpointer.save(step, run.state, run.train_iter)
        clock.skip()
      if stop:
        run.stopped_at = step
        break


def _summarize(run: _Run) -> dict[str, Any]:
  """The run's summary; process 0 prints it (or how to resume a stopped run)."""
  summary = {
      "workdir": os.path.abspath(run.workdir),
      "steps": run.step,
      "train_loss": run.last_train.get("loss"),
      "eval_loss": run.last_eval.get("loss"),
      "tokens_per_sec": run.last_train.get("tokens_per_sec"),
      "preempted": run.guard.reason if run.stopped_at is not None else None,
  }
  if run.is_main:
    if run.stopped_at is not None:
      print(f"stopped by {run.guard.reason} after step {run.stopped_at} of "
            f"{run.config.train.num_steps}; saved checkpoint {run.stopped_at} "
            f"in {run.checkpointer.directory}; run the same command again to "
            "resume", flush=True)
    else:
      _print_summary(summary, run.checkpointer.directory)
  return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, allow_config_change: bool = False,
                       memory_check: bool = True) -> dict[str, Any]:
  """Trains config in workdir (resuming if it holds a run); returns a summary.

  Stops early, saving the step, on SIGTERM/SIGINT (summary["preempted"]
  names the signal). Refuses bad configs and workdirs with
  validate.ConfigError before writing anything; faults during the run raise
  faults.RunError (NonFiniteError, checkpoint.CheckpointError) in one line.
  """
  run = _setup_run(config, workdir, allow_config_change, memory_check)
  try:
    _train_loop(run)
  except OSError as e:
    run.close(quiet=True)
    raise faults.io_failed(e, run.step,
                           run.checkpointer.last_good_text()) from e
  except BaseException:
    run.close(quiet=True)
    raise
  run.close()
  return _summarize(run)


def _print_summary(summary: dict[str, Any], checkpoint_dir: str) -> None:
  def fmt(x):
    return "n/a" if x is None else f"{float(x):.4f}"
  print(f"done: {summary['steps']} steps; train loss {fmt(summary['train_loss'])}, "
        f"eval loss {fmt(summary['eval_loss'])}, "
        f"{fmt(summary['tokens_per_sec'])} tokens/s\n"
        f"  metrics:     {os.path.join(summary['workdir'], 'metrics.jsonl')}\n"
        f"  tensorboard: {os.path.join(summary['workdir'], 'tensorboard')}\n"
        f"  checkpoints: {checkpoint_dir}")
