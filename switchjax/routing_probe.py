"""Probes of a trained decoder-only model's routers on the validation split.

  p = probe(config, workdir)      # the workdir's newest checkpoint
  p.choice[layer]                 i32[N] the expert each token's router ranks first
  p.tokens, p.domains             i32[N] token ids, their document's domain
  p.bf16_mismatch[layer]          fraction of tokens whose first choice under a
                                  bfloat16 router differs from float32's

The tokens are the validation split's, packed exactly as the eval pipeline
packs them (documents concatenated in order, seq_length + 1 per example),
so every token keeps its document. Domains come from the bundled corpus's
document ids: "kjv/..." is the Bible, everything else the Python docs.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from switchjax import checkpoint as ckpt_lib
from switchjax import model as model_lib
from switchjax import moe
from switchjax import train as train_lib
from switchjax.data import corpus
from switchjax.data import pipeline
from switchjax.data import tfds_corpus
from switchjax.data import vocab as vocab_lib

DOMAINS = ("bible", "python")


def domain_of(doc_id: str) -> int:
  return 0 if doc_id.startswith("kjv/") else 1


@dataclasses.dataclass
class Probe:
  layers: list[str]
  choice: list[np.ndarray]
  bf16_mismatch: list[float]
  tokens: np.ndarray
  domains: np.ndarray


def validation_examples(config) -> tuple[np.ndarray, np.ndarray]:
  """(i32[N, L+1] packed examples, i32[N, L+1] domain of each token)."""
  if config.model.arch != "decoder_only":
    raise ValueError("routing_probe reads decoder_only models")
  if config.data.name not in tfds_corpus.BUNDLED_NAMES:
    raise ValueError("routing_probe knows the domains of the bundled corpus "
                     f"only, not {config.data.name!r}")
  vocab = vocab_lib.get_vocabulary(config)
  source = tfds_corpus.data_source(config.data.name, "validation",
                                   config.data.data_dir or None)
  # The tfds records hold text only (in tfds's order): ids come from the
  # corpus file.
  doc_ids = {d["text"]: d["id"] for d in corpus.read_documents("validation")}
  ids, doms = [], []
  for i in range(len(source)):
    text = source[i]["text"]
    text = text.decode() if isinstance(text, bytes) else text
    t = vocab.encode_np(text, append_eos=True)
    ids.append(t)
    doms.append(np.full(t.size, domain_of(doc_ids[text]), np.int32))
  length = pipeline._chunk_length(config)  # pylint: disable=protected-access
  ids, doms = np.concatenate(ids), np.concatenate(doms)
  n = ids.size // length
  return (ids[:n * length].reshape(n, length),
          doms[:n * length].reshape(n, length))


@contextlib.contextmanager
def _recorded_router_inputs() -> Iterator[list]:
  """Records (router input, kernel) of every Router call, in call order."""
  calls, original = [], moe.Router.__call__

  def recording(self, x, **kw):
    calls.append((x, self.kernel[...]))
    return original(self, x, **kw)

  moe.Router.__call__ = recording
  try:
    yield calls
  finally:
    moe.Router.__call__ = original


def _first_choice(x: jax.Array, kernel: jax.Array, dtype) -> np.ndarray:
  logits = jnp.einsum("...M,ME->...E", x.astype(dtype), kernel.astype(dtype))
  return np.asarray(jnp.argmax(logits, axis=-1)).reshape(-1)


def probe(config, workdir: str, max_batches: int = 0) -> Probe:
  """Routes the validation split through the newest checkpoint of workdir."""
  trainer = train_lib.make_trainer(config)
  data = pipeline.make_iterator(config, "train",
                                batch_size=config.train.batch_size)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=1000, log=None)
  try:
    step, state = checkpointer.restore_latest(trainer.abstract_state, data)
  finally:
    checkpointer.close()
  if step is None:
    raise ValueError(f"{workdir} holds no checkpoint")
  model = nnx.merge(trainer.eval_graphdef, state["params"], trainer.rng_state)
  examples, domains = validation_examples(config)
  b = config.train.batch_size
  batches = len(examples) // b
  if max_batches:
    batches = min(batches, max_batches)
  layers: list[list[np.ndarray]] = []
  mismatch: list[list[float]] = []
  for i in range(batches):
    chunk = examples[i * b:(i + 1) * b]
    with _recorded_router_inputs() as calls:
      model(decoder_input_tokens=jnp.asarray(chunk[:, :-1]))
    for j, (x, kernel) in enumerate(calls):
      if j == len(layers):
        layers.append([])
        mismatch.append([])
      f32 = _first_choice(x, kernel, jnp.float32)
      layers[j].append(f32)
      mismatch[j].append(float(np.mean(
          f32 != _first_choice(x, kernel, jnp.bfloat16))))
  names = [f"decoder/layer_{i}" for i, sparse in enumerate(
      model_lib.sparse_layers(config.moe, config.model.num_decoder_layers))
           if sparse]
  return Probe(layers=names[:len(layers)],
               choice=[np.concatenate(c) for c in layers],
               bf16_mismatch=[float(np.mean(m)) for m in mismatch],
               tokens=examples[:batches * b, :-1].reshape(-1),
               domains=domains[:batches * b, :-1].reshape(-1))


def domain_fractions(p: Probe, num_experts: int) -> np.ndarray:
  """f32[layers, E, 2]: of each expert's tokens, the fraction per domain."""
  out = np.zeros((len(p.choice), num_experts, len(DOMAINS)))
  for l, choice in enumerate(p.choice):
    for d in range(len(DOMAINS)):
      out[l, :, d] = np.bincount(choice[p.domains == d], minlength=num_experts)
  return out / np.maximum(out.sum(-1, keepdims=True), 1)


def top_tokens(p: Probe, layer: int, expert: int, k: int = 8) -> list[int]:
  """The k token ids an expert takes most often, by count."""
  ids = p.tokens[p.choice[layer] == expert]
  if ids.size == 0:
    return []
  counts = np.bincount(ids)
  return [int(i) for i in np.argsort(-counts)[:k] if counts[i]]
