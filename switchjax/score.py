r"""Scores a batch with a workdir's checkpoint: logits, target log-probs, routing.

  python -m switchjax.score --workdir WD --inputs IN.npz --out OUT.npz \
      [--step N]

IN.npz holds `encoder_input_tokens` i32[B, Li], `decoder_input_tokens`
i32[B, Lt] and `decoder_target_tokens` i32[B, Lt] (only the decoder keys for
a decoder-only model). The newest checkpoint (or --step N) runs in eval mode
(eval capacity factor, no dropout or jitter); encoder id 0 is padding, as in
training. OUT.npz gets

  logits             f32[B, Lt, V]
  target_log_probs   f32[B, Lt]   log p(decoder_target_tokens)
  moe_layers         str[layers]  e.g. 'encoder/layer_1'
  <layer>/expert     i32[B, L, K] the experts each token chose (token-choice
                                  routers), in order of preference
  <layer>/dropped    bool[B, L, K] that choice found no free slot
  <layer>/dispatched bool[B, L, E] the experts that processed each token
                                  (every router, expert choice included)

This is how a converted checkpoint is checked against the implementation it
came from, and how rank-classification evals are scored (t5x's score mode).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from switchjax import moe as moe_lib
from switchjax import routing as routing_lib

ENCODER_DECODER_KEYS = ("encoder_input_tokens", "decoder_input_tokens",
                        "decoder_target_tokens")
DECODER_ONLY_KEYS = ENCODER_DECODER_KEYS[1:]


class ScoreError(ValueError):
  """Inputs that cannot be scored (one line)."""


@contextlib.contextmanager
def recorded_routing() -> Iterator[list[routing_lib.Routing]]:
  """Collects the Routing of every MoeLayer call, in call order."""
  calls, original = [], moe_lib.MoeLayer.route

  def route(self, x, token_ids=None):
    routing, logits = original(self, x, token_ids)
    calls.append(routing)
    return routing, logits

  moe_lib.MoeLayer.route = route
  try:
    yield calls
  finally:
    moe_lib.MoeLayer.route = original


def _per_token(routing: routing_lib.Routing, batch: int, length: int
               ) -> dict[str, jax.Array]:
  """Routing of [G, S] groups -> per-token arrays over [B, L] (row-major)."""
  e = routing.num_experts
  s = routing.num_tokens
  # token_index S marks an empty slot: one_hot over S + 1, then drop it.
  onehot = jax.nn.one_hot(routing.token_index, s + 1, dtype=jnp.bool_)[..., :s]
  dispatched = jnp.transpose(jnp.any(onehot, axis=2), (0, 2, 1))  # [G, S, E]
  out = {"dispatched": dispatched.reshape(batch, length, e)}
  if routing.expert_index is not None:
    k = routing.expert_index.shape[-1]
    out["expert"] = routing.expert_index.reshape(batch, length, k)
    dropped = routing.slot_index >= e * routing.capacity
    out["dropped"] = dropped.reshape(batch, length, k)
  return out


def check_inputs(batch: dict[str, np.ndarray], arch: str,
                 vocab_size: int) -> dict[str, np.ndarray]:
  """The model's inputs from `batch`, or ScoreError naming the problem."""
  keys = ENCODER_DECODER_KEYS if arch == "encoder_decoder" else DECODER_ONLY_KEYS
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ScoreError(f"inputs lack {', '.join(missing)} (a {arch} model "
                     f"needs {', '.join(keys)})")
  out = {}
  for k in keys:
    a = np.asarray(batch[k])
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
      raise ScoreError(f"inputs {k} must be integer ids [B, L], got "
                       f"{a.dtype}{list(a.shape)}")
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
      raise ScoreError(f"inputs {k} has ids outside [0, {vocab_size})")
    out[k] = a.astype(np.int32)
  rows = {a.shape[0] for a in out.values()}
  if len(rows) > 1 or out["decoder_input_tokens"].shape != out[
      "decoder_target_tokens"].shape:
    raise ScoreError("inputs disagree in shape: "
                     + ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()))
  return out


def score(model: nnx.Module, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """Scores `batch` (check_inputs' keys) with `model` in eval mode."""
  inputs = {k: jnp.asarray(v) for k, v in batch.items()
            if k != "decoder_target_tokens"}
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, inputs):
    model = nnx.merge(graphdef, state)
    with recorded_routing() as calls:
      logits, aux = model(**inputs)
    return logits, aux, calls

  logits, aux, calls = forward(state, inputs)
  names = aux.layer_names  # static: kept in the output's tree structure
  targets = jnp.asarray(batch["decoder_target_tokens"])
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                                  targets[..., None], axis=-1)[..., 0]
  out = {"logits": np.asarray(logits, np.float32),
         "target_log_probs": np.asarray(log_probs, np.float32),
         "moe_layers": np.array(names, dtype=str)}
  for name, routing in zip(names, calls):
    stack = name.split("/")[0]
    key = "encoder_input_tokens" if stack == "encoder" else "decoder_input_tokens"
    b, l = batch[key].shape
    for field, value in _per_token(routing, b, l).items():
      out[f"{name}/{field}"] = np.asarray(value)
  return out



def load_model(workdir: str, step=None) -> tuple[Any, int, nnx.Module]:
  """(config, step, model in eval mode) of a workdir's checkpoint."""
  from switchjax import train as train_lib  # pylint: disable=g-import-not-at-top
  from switchjax import weights  # pylint: disable=g-import-not-at-top
  config = weights.read_config(workdir)
  trainer = train_lib.make_trainer(config)
  step, state = weights.restore(workdir, trainer.abstract_state, step)
  model = nnx.merge(trainer.eval_graphdef, state["params"], trainer.rng_state)
  return config, step, model


def score_file(workdir: str, inputs: str, out: str, step=None) -> str:
  """Scores IN.npz into OUT.npz; the line to print."""
  if os.path.exists(out):
    raise ScoreError(f"--out {out} already exists; scoring never overwrites")
  try:
    with np.load(inputs) as f:
      batch = dict(f)
  except (OSError, ValueError) as e:
    raise ScoreError(f"--inputs {inputs}: {e}") from None
  config, step, model = load_model(workdir, step)
  batch = check_inputs(batch, config.model.arch, config.model.vocab_size)
  try:
    result = score(model, batch)
  except ValueError as e:  # e.g. a group size that does not divide B * L
    raise ScoreError(str(e).splitlines()[0]) from None
  tmp = out + f".partial-{os.getpid()}.npz"
  np.savez(tmp, **result)
  os.replace(tmp, out)
  return (f"scored {len(batch['decoder_input_tokens'])} rows with step {step} "
          f"of {workdir} into {out}")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from switchjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from switchjax import weights  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    print(score_file(f.workdir, f.inputs, f.out, f.step))
  except (ScoreError, weights.WeightsError, ckpt_lib.CheckpointError) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")


def _define_flags() -> None:
  """Flags of the command line only, so that importing this module defines none."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The switchjax workdir to score with.")
  flags.DEFINE_string("inputs", None, "IN.npz with the token arrays.")
  flags.DEFINE_string("out", None, "OUT.npz to write (must not exist).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.mark_flags_as_required(["workdir", "inputs", "out"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  app.run(main)
