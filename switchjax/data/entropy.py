"""Unigram entropy of the bundled validation split: a loss any model must beat.

A model that ignores context can at best predict each token with its
frequency; its cross-entropy is then the entropy of the unigram distribution.
Training loss (nats per target token) below this shows the model uses context.
"""
import functools

import numpy as np

from switchjax.data import corpus
from switchjax.data import vocab as vocab_lib


@functools.lru_cache(maxsize=4)
def _entropy(vocab_path: str) -> float:
  vocab = vocab_lib.Vocabulary(vocab_path)
  ids = [vocab.encode_np(d["text"], append_eos=True)
         for d in corpus.read_documents("validation")]
  counts = np.bincount(np.concatenate(ids), minlength=vocab.vocab_size)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_entropy(config) -> float:
  """Nats/token of the validation documents' token frequencies (eos included),
  under the vocabulary of `config.data.vocab_path`."""
  return _entropy(vocab_lib.get_vocabulary(config).model_path)
