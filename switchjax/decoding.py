"""Autoregressive decoding with a key/value cache: greedy, temperature, top-k.

Notation: see `switchjax/__init__.py`; here B rows, T = the decoder buffer's
length (the longest prompt plus `max_new_tokens`), Li the encoder length.

`generate` runs the whole decode in one compiled `lax.while_loop`. Rows of
different prompt lengths need no padding alignment: every row starts at
position 0 and is fed one token per step, its own prompt token while it has
one (teacher-forced, no logits used) and the chosen token after that, until
it emits eos or has `max_new_tokens`; the loop ends when every row has.

- Decoder-only: the prompt is the start of the decoder sequence (the command
  line puts eos first, the document boundary of the packed training stream).
- Encoder-decoder: the prompt is the encoder input, encoded once; each
  cross-attention projects the encoder output to keys/values once
  (`MultiHeadAttention.cache_inputs`); the decoder starts from id 0 (T5).
- Self-attention keeps a cache of T keys/values per layer
  (`MultiHeadAttention.init_cache`); step t writes entry t and attends to
  entries 0..t (the mask), so a step costs O(T), not O(t^2) recomputation.

MoE layers at decode route the B tokens of one step as one group (the
decoder's group size becomes B), with the eval capacity factor: C =
max(min_capacity, ceil(K * B * factor / E)), capped at B. One row (B=1) can
never drop; with many rows a popular expert can. `dropless=True` gives the
decoder's token-choice layers dropless dispatch (`moe.dispatch='dropless'`),
so a token's output never depends on the other rows: then cached decoding
equals recomputing the prefix exactly (tests). The encoder keeps its config
(expert choice included): it runs once on the whole input either way.

`cache=False` recomputes the whole model on the [B, T] buffer every step (the
reference the cached path is tested and timed against).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from switchjax import model as model_lib
from switchjax import moe as moe_lib
from switchjax import routing as routing_lib


@dataclasses.dataclass
class Decoded:
  """What `generate` returns.

  tokens: per row, the new ids after the prompt, ending before eos.
  finished: per row, whether it stopped at eos (else at max_new_tokens).
  steps: decoder steps the loop ran.
  logits: f32[B, T, V] the logits at every fed position (`return_logits`),
    position t predicting token t + 1; rows are the caller's.
  """
  tokens: list[np.ndarray]
  finished: list[bool]
  steps: int
  logits: Optional[np.ndarray] = None


LENGTH_BUCKET = 16


def padded_rows(rows: int, length: int, group_size: int) -> int:
  """Rows to run so that `group_size` groups B * length tokens evenly.

  The MoE layers cut B * L tokens into groups of min(group_size, B * L),
  which must divide B * L: rows are added (empty prompts, dropped after).
  """
  if not group_size or rows * length <= group_size or (
      rows * length) % group_size == 0:
    return rows
  step = group_size // math.gcd(group_size, length)
  return -(-rows // step) * step


def choose(logits: jax.Array, rng: jax.Array, temperature: float,
           top_k: int) -> jax.Array:
  """Next ids i32[B] from logits f32[B, V]: argmax at temperature 0, else a
  draw from softmax(logits / temperature) over the top_k ids (0 = all)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _moe_layers(stack: model_lib.Stack) -> list[moe_lib.MoeLayer]:
  return [layer.mlp for layer in stack.layers if layer.sparse]


def decode_model(model: nnx.Module, rows: int, length: int, *,
                 dropless: bool = False, cache: bool = True) -> nnx.Module:
  """A copy of `model` (eval mode) set up to decode `rows` x `length`."""
  model = nnx.clone(model)
  model.eval()
  for layer in _moe_layers(model.decoder):
    layer.group_size = rows  # one group: the tokens of a step
    if dropless and routing_lib.is_causal(layer.router_name,
                                          layer.batch_prioritized):
      layer.dispatch = "dropless"
  if cache:
    for layer in model.decoder.layers:
      layer.self_attention.init_cache(rows, length)
  return model


def _buffers(prompts: Sequence[Sequence[int]], encoder_decoder: bool,
             max_new_tokens: int, rows: int):
  """(decoder buffer i32[R, T], forced length i32[R], encoder i32[R, Li] or
  None) for R >= len(prompts) rows, padded for the encoder's groups. The
  longest prompt is rounded up to a multiple of LENGTH_BUCKET, so that
  batches of similar prompts reuse one compiled loop."""
  longest = -(-max(len(p) for p in prompts) // LENGTH_BUCKET) * LENGTH_BUCKET
  if encoder_decoder:
    enc = np.zeros((rows, max(longest, LENGTH_BUCKET)), np.int32)  # 0: padding
    for i, p in enumerate(prompts):
      enc[i, :len(p)] = p
    forced = np.ones(rows, np.int32)  # the start id 0
    seq = np.zeros((rows, 1 + max_new_tokens), np.int32)
    return seq, forced, enc
  seq = np.zeros((rows, longest + max_new_tokens), np.int32)
  forced = np.ones(rows, np.int32)
  for i, p in enumerate(prompts):
    seq[i, :len(p)] = p
    forced[i] = len(p)
  return seq, forced, None


def _check(prompts, encoder_decoder: bool, vocab_size: int,
           max_new_tokens: int, temperature: float, top_k: int) -> None:
  if not prompts:
    raise ValueError("no prompts to decode")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0 <= top_k <= vocab_size:
    raise ValueError(f"top_k must be in [0, {vocab_size}], got {top_k}")
  for i, p in enumerate(prompts):
    if not len(p) and not encoder_decoder:
      raise ValueError(f"prompt {i} is empty (a decoder-only model needs at "
                       "least one token to start from)")
    if len(p) and (min(p) < 0 or max(p) >= vocab_size):
      raise ValueError(f"prompt {i} has ids outside [0, {vocab_size})")


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *,
             eos_id: int, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, dropless: bool = False,
             cache: bool = True, return_logits: bool = False) -> Decoded:
  """Decodes every prompt (lists of ids) with `model` (see the module doc)."""
  encoder_decoder = isinstance(model, model_lib.EncoderDecoder)
  vocab_size = model.embedding.shape[0]
  _check(prompts, encoder_decoder, vocab_size, max_new_tokens, temperature,
         top_k)
  n = len(prompts)
  rows = n
  encoder_moe = _moe_layers(model.encoder) if encoder_decoder else []
  if encoder_moe:  # the encoder's groups must divide R * Li
    longest = max(LENGTH_BUCKET, max(len(p) for p in prompts))
    rows = padded_rows(n, -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET,
                       encoder_moe[0].group_size)
  seq, forced, enc = _buffers(prompts, encoder_decoder, max_new_tokens, rows)
  length = seq.shape[1]
  dm = decode_model(model, rows, length, dropless=dropless, cache=cache)
  run = _compiled(nnx.graphdef(dm), rows, length, encoder_decoder, cache,
                  eos_id, max_new_tokens, float(temperature), int(top_k),
                  return_logits)
  out_seq, done, steps, logits = run(nnx.state(dm), jnp.asarray(seq),
                                     jnp.asarray(forced),
                                     None if enc is None else jnp.asarray(enc),
                                     jax.random.key(seed))
  out_seq, done = np.asarray(out_seq), np.asarray(done)
  tokens, finished = [], []
  for i in range(n):
    new = out_seq[i, forced[i]:forced[i] + max_new_tokens]
    stop = np.flatnonzero(new == eos_id)
    finished.append(bool(stop.size))
    tokens.append(new[:stop[0]] if stop.size else new)
  return Decoded(tokens=tokens, finished=finished, steps=int(steps),
                 logits=None if logits is None else np.asarray(logits)[:n])


@functools.lru_cache(maxsize=32)
def _compiled(*settings):
  """The jitted decode loop for these static settings (`_decode_loop`'s
  arguments), kept so that repeated calls reuse its compilation."""
  return jax.jit(_decode_loop(*settings))


def _decode_loop(graphdef, rows, length, encoder_decoder, cache, eos_id,
                 max_new_tokens, temperature, top_k, return_logits):
  """The pure function (state, seq, forced, enc, rng) -> (seq, done, steps,
  logits) that `generate` compiles."""
  key_positions = jnp.arange(length, dtype=jnp.int32)[None]

  def cached_step(m, tokens_t, t, enc_valid):
    mask = jnp.broadcast_to((key_positions <= t)[:, None, None, :],
                            (rows, 1, 1, length))
    cross = None if enc_valid is None else enc_valid[:, None, None, :]
    x, _ = m.decoder(m.embed(tokens_t[:, None]), mask=mask,
                     positions=jnp.full((1, 1), t, jnp.int32),
                     key_positions=key_positions, cross_mask=cross,
                     token_ids=tokens_t[:, None])
    return m.logits(x)[:, 0]

  def uncached_step(m, seq, t, enc):
    logits, _ = m(enc, seq) if encoder_decoder else m(seq)
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)

  def run(state, seq, forced, enc, rng):
    m = nnx.merge(graphdef, state)
    enc_valid = None
    if encoder_decoder and cache:
      encoded, _ = m.encode(enc)
      enc_valid = enc > 0
      for layer in m.decoder.layers:
        layer.cross_attention.cache_inputs(encoded)
    gd, caches, rest = nnx.split(m, nnx.Cache, ...)
    logits0 = (jnp.zeros((rows, length, m.embedding.shape[0]), jnp.float32)
               if return_logits else jnp.zeros((), jnp.float32))
    done0 = jnp.zeros((rows,), jnp.bool_)

    def cond(carry):
      t, _, done, _, _ = carry
      return (t < length - 1) & ~jnp.all(done)

    def body(carry):
      t, seq, done, caches, logits_buf = carry
      if cache:
        m = nnx.merge(gd, caches, rest)
        logits = cached_step(m, seq[:, t], t, enc_valid)
        caches = nnx.state(m, nnx.Cache)
      else:
        logits = uncached_step(nnx.merge(gd, caches, rest), seq, t, enc)
      nxt = choose(logits, jax.random.fold_in(rng, t), temperature, top_k)
      is_forced = t + 1 < forced
      tok = jnp.where(is_forced, seq[:, t + 1], jnp.where(done, 0, nxt))
      seq = seq.at[:, t + 1].set(tok)
      new = ~is_forced & ~done
      done = done | (new & ((tok == eos_id)
                            | (t + 2 - forced >= max_new_tokens)))
      if return_logits:
        logits_buf = logits_buf.at[:, t].set(logits)
      return t + 1, seq, done, caches, logits_buf

    t, seq, done, _, logits_buf = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), seq, done0, caches, logits0))
    return seq, done, t, logits_buf if return_logits else None

  return run

