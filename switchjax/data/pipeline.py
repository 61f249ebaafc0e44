"""Grain input pipelines: documents -> tokens -> packed examples -> batches.

(A text-to-text task, {inputs, targets} examples such as the bundled
`kjv_books`, skips packing: one example a row, `_task_features`.)

Every stage is a grain dataset, so the iterator's `get_state()` is a small
dict (element counters) and `set_state()` continues the exact stream.

  documents  tfds source, this process's slice [process_index::process_count],
             shuffled per epoch (train), repeated forever
  tokens     SentencePiece in a map; decoder_only appends eos per document,
             encoder_decoder does not (T5 concatenates documents without one)
  packing    concatenate, split into chunks (grain ConcatThenSplitIterDataset)
  features   span corruption (seeded per example) or next-token shift
  batch      B examples -> dict of arrays

Batch features (t5x names):
  encoder_decoder: encoder_input_tokens i32[B, inputs_length],
    decoder_input_tokens, decoder_target_tokens i32[B, targets_length],
    decoder_loss_weights f32[B, targets_length]
  decoder_only: decoder_input_tokens, decoder_target_tokens i32[B, seq_length],
    decoder_loss_weights f32[B, seq_length]
"""
import functools

import grain
import numpy as np

from switchjax.data import span_corruption as sc
from switchjax.data import tfds_corpus
from switchjax.data import vocab as vocab_lib

_SPLIT_CODES = {"train": 0, "validation": 1}


def _seed(*parts: int) -> int:
  """A uint32 seed mixed from ints (grain wants seeds in [0, 2**32))."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _tokenize(example, *, vocab: vocab_lib.Vocabulary, append_eos: bool):
  return {"tokens": vocab.encode_np(example["text"], append_eos=append_eos)}


def _pad(x: np.ndarray, length: int) -> np.ndarray:
  out = np.zeros(length, dtype=np.int32)  # pad id 0
  out[:len(x)] = x
  return out


def _shift_right(targets: np.ndarray) -> np.ndarray:
  """Decoder inputs: targets delayed one step, starting with 0 (T5)."""
  return np.concatenate([np.zeros(1, np.int32), targets[:-1]])


def _span_corruption_features(example, rng, *, vocab, inputs_length,
                              targets_length, noise_density,
                              mean_noise_span_length):
  inputs, targets = sc.span_corruption(
      example["tokens"], rng, noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length,
      first_sentinel_id=vocab.sentinel_id(0), eos_id=vocab.eos_id)
  targets = _pad(targets, targets_length)
  return {
      "encoder_input_tokens": _pad(inputs, inputs_length),
      "decoder_input_tokens": _shift_right(targets),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets != 0).astype(np.float32),
  }


def _next_token_features(example):
  chunk = example["tokens"]  # seq_length + 1 tokens, 0-padded only at the end
  targets = chunk[1:].astype(np.int32)
  return {
      "decoder_input_tokens": chunk[:-1].astype(np.int32),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets != 0).astype(np.float32),
  }


def is_task(source) -> bool:
  """Whether a data source holds text-to-text examples {inputs, targets}
  (else documents {text} for pre-training)."""
  return len(source) > 0 and "targets" in source[0]


def is_task_data(config) -> bool:
  """Whether config.data names a text-to-text task (the bundled corpus never
  is; another tfds dataset is one when its examples have targets)."""
  if config.data.name in tfds_corpus.BUNDLED_NAMES:
    return False
  return is_task(tfds_corpus.data_source(config.data.name, "validation",
                                         config.data.data_dir or None))


def task_ids(vocab: vocab_lib.Vocabulary, inputs: str, arch: str) -> list[int]:
  """The ids a model of `arch` reads for a task's `inputs` before its answer:
  encoder inputs + eos (T5), or for a decoder-only model eos (the document
  boundary) + inputs + sentinel 0 (the separator before the answer)."""
  ids = vocab.encode(inputs)
  if arch == "decoder_only":
    return [vocab.eos_id] + ids + [vocab.sentinel_id(0)]
  return ids + [vocab.eos_id]


def _task_features(example, *, vocab, arch, inputs_length, targets_length,
                   seq_length):
  """A text-to-text example as one row (no packing); inputs are truncated
  from the end to fit, targets likewise (then without their eos)."""
  text = lambda k: (example[k].decode("utf-8") if isinstance(example[k], bytes)
                    else example[k])
  prompt = task_ids(vocab, text("inputs"), arch)
  answer = vocab.encode(text("targets")) + [vocab.eos_id]
  if arch == "decoder_only":
    prompt = prompt[:max(2, seq_length + 1 - len(answer))]
    if prompt[-1] != vocab.sentinel_id(0):  # truncated: keep the separator
      prompt[-1] = vocab.sentinel_id(0)
    chunk = _pad(np.asarray(prompt + answer, np.int32)[:seq_length + 1],
                 seq_length + 1)
    targets = chunk[1:]
    weights = (targets != 0) & (np.arange(seq_length) >= len(prompt) - 1)
    return {"decoder_input_tokens": chunk[:-1], "decoder_target_tokens": targets,
            "decoder_loss_weights": weights.astype(np.float32)}
  targets = _pad(np.asarray(answer[:targets_length], np.int32), targets_length)
  return {
      "encoder_input_tokens": _pad(np.asarray(prompt[:inputs_length], np.int32),
                                   inputs_length),
      "decoder_input_tokens": _shift_right(targets),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets != 0).astype(np.float32),
  }


def _read_options(name: str) -> grain.ReadOptions:
  """How the documents are read.

  The bundled corpus is local and small: inline reads, no threads. Other tfds
  data (C4, perhaps on GCS) gets grain's reader threads to hide latency.
  """
  if name in tfds_corpus.BUNDLED_NAMES or name in tfds_corpus.BUNDLED_TASKS:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions()


def _chunk_length(config) -> int:
  """Raw tokens per example; validate.prepare has checked the lengths."""
  d = config.data
  if config.model.arch == "decoder_only":
    return d.seq_length + 1
  raw_length, _ = sc.random_spans_helper(
      d.inputs_length, d.noise_density, d.mean_noise_span_length)
  return raw_length


def make_dataset(config, split: str, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The grain pipeline behind `make_iterator` (see the module docstring)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  chunk_length = _chunk_length(config)
  decoder_only = config.model.arch == "decoder_only"
  train = split == "train"
  vocab = vocab_lib.get_vocabulary(config)
  source = tfds_corpus.data_source(config.data.name, split,
                                   config.data.data_dir or None)

  if is_task(source):
    return _task_dataset(config, source, train, batch_size, process_index,
                         process_count, vocab)
  docs = grain.MapDataset.source(source)
  if len(docs) < process_count:
    raise ValueError(f"split {split!r} of {config.data.name!r} has {len(docs)} "
                     f"documents, fewer than process_count={process_count}")
  docs = docs[process_index::process_count]  # disjoint per host
  if train:
    # Shuffle then repeat: grain reseeds each epoch (seed + epoch).
    docs = docs.shuffle(seed=_seed(config.data.shuffle_seed, process_index))
  docs = docs.repeat()  # train: forever; eval: cycled if short
  tokens = docs.map(functools.partial(_tokenize, vocab=vocab,
                                      append_eos=decoder_only))
  ds = tokens.to_iter_dataset(_read_options(config.data.name))
  ds = ds.filter(lambda x: x["tokens"].size > 0)
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": chunk_length})
  if decoder_only:
    ds = ds.map(_next_token_features)
  else:
    d = config.data
    ds = ds.random_map(
        functools.partial(
            _span_corruption_features, vocab=vocab,
            inputs_length=d.inputs_length, targets_length=d.targets_length,
            noise_density=d.noise_density,
            mean_noise_span_length=d.mean_noise_span_length),
        seed=_noise_seed(config, split, process_index))
  return ds.batch(batch_size, drop_remainder=True)


def _task_dataset(config, source, train, batch_size, process_index,
                  process_count, vocab) -> grain.IterDataset:
  """A text-to-text task's batches: one example a row, this process's slice,
  shuffled per epoch in training, repeated forever."""
  d = config.data
  examples = grain.MapDataset.source(source)
  if train and d.train_examples:
    examples = examples[:d.train_examples]  # a small task: its first N
  examples = examples[process_index::process_count]
  if train:
    examples = examples.shuffle(seed=_seed(d.shuffle_seed, process_index))
  examples = examples.repeat().map(functools.partial(
      _task_features, vocab=vocab, arch=config.model.arch,
      inputs_length=d.inputs_length, targets_length=d.targets_length,
      seq_length=d.seq_length))
  return examples.to_iter_dataset(_read_options(d.name)).batch(
      batch_size, drop_remainder=True)


def num_batches(config, split: str, *, batch_size: int,
                process_count: int = 1) -> int:
  """Batches in one pass over `split`: what every process can read before
  its slice of documents wraps around (the smallest slice decides).

  Packing concatenates documents exactly, so the first
  tokens // chunk_length examples of a process come from one pass.
  """
  d = config.data
  return _num_batches(d.name, d.data_dir or None,
                      vocab_lib.resolve_path(d.vocab_path),
                      config.model.arch == "decoder_only",
                      _chunk_length(config), split, batch_size, process_count)


@functools.lru_cache(maxsize=16)
def _num_batches(name, data_dir, vocab_path, append_eos, chunk_length, split,
                 batch_size, process_count) -> int:
  vocab = vocab_lib.Vocabulary(vocab_path)
  source = tfds_corpus.data_source(name, split, data_dir)
  if is_task(source):  # one example a row
    return len(source) // process_count // batch_size
  lengths = np.array([vocab.encode_np(source[i]["text"],
                                      append_eos=append_eos).size
                      for i in range(len(source))])
  return min(int(lengths[p::process_count].sum()) // chunk_length // batch_size
             for p in range(process_count))


def _noise_seed(config, split: str, process_index: int) -> int:
  """Span-corruption noise: config.seed in training; for evaluation the data's
  own seed, so every seed of an experiment is scored on the same targets."""
  seed = config.seed if split == "train" else config.data.shuffle_seed
  return _seed(seed, process_index, _SPLIT_CODES.get(split, 2))


def make_iterator(config, split: str, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """Endless iterator of this process's batches (dict of numpy arrays).

  `split` 'train' shuffles documents (data.shuffle_seed) and reshuffles every
  epoch; other splits ('validation') read in order, so each new iterator
  yields the same batches. Span-corruption noise is seeded by the example's
  position in the stream and config.seed (train) or data.shuffle_seed
  (other splits: the same eval targets for every seed). The iterator has
  `get_state()`/`set_state(state)` for checkpointing.
  """
  return iter(make_dataset(config, split, batch_size=batch_size,
                           process_index=process_index,
                           process_count=process_count))
