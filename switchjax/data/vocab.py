"""SentencePiece vocabulary with T5's 100 sentinel ids appended.

Ids follow T5: pad 0 (also the decoder's start token), eos 1, unk 2, then the
SentencePiece pieces; the `extra_ids` sentinels take the ids after the last
piece, highest first: sentinel i (`<extra_id_i>`) = sp_vocab_size + 99 - i.
The model's embedding table has `vocab_size` rows: sp_vocab_size + 100 rounded
up to a multiple of 128 (T5: 32000 + 100 -> 32128), so a few ids are unused.
"""
import functools
import os
import re
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

BUNDLED_VOCAB_PATH = os.path.join(
    os.path.dirname(__file__), "vocab", "sentencepiece.model")
EXTRA_IDS = 100
VOCAB_MULTIPLE = 128  # embedding rows padded for even sharding / TPU tiles
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


class Vocabulary:
  """Text <-> ids with a SentencePiece model plus T5 sentinels."""

  def __init__(self, model_path: str, extra_ids: int = EXTRA_IDS):
    if not os.path.isfile(model_path):
      raise ValueError(f"SentencePiece model not found: {model_path!r}")
    self.model_path = model_path
    self.extra_ids = extra_ids
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    if self._sp.pad_id() != 0 or self._sp.eos_id() < 0:
      raise ValueError(
          f"{model_path}: need pad id 0 and an eos id (T5's convention), got "
          f"pad {self._sp.pad_id()}, eos {self._sp.eos_id()}")
    self.sp_vocab_size = self._sp.get_piece_size()
    self.pad_id = 0
    self.eos_id = self._sp.eos_id()
    self.unk_id = self._sp.unk_id()
    n = self.sp_vocab_size + extra_ids
    self.vocab_size = -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  def __reduce__(self):  # SentencePieceProcessor does not pickle
    return (Vocabulary, (self.model_path, self.extra_ids))

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_i>`: the first sentinel is the highest id."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f"sentinel index {i} outside [0, {self.extra_ids})")
    return self.sp_vocab_size + self.extra_ids - 1 - i

  def encode(self, text: str | bytes) -> list[int]:
    """Pieces of `text`, without eos."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return self._sp.encode(text)

  def encode_with_sentinels(self, text: str) -> list[int]:
    """`encode`, with each `<extra_id_i>` in the text as sentinel i's id
    (how a span-corruption prompt is written; plain `encode` splits it)."""
    ids = []
    for i, part in enumerate(_SENTINEL.split(text)):
      if i % 2:
        ids.append(self.sentinel_id(int(part)))
      elif part.strip():
        ids.extend(self.encode(part.strip()))
    return ids

  def encode_np(self, text: str | bytes, append_eos: bool = False) -> np.ndarray:
    """`encode` as i32[L] (+1 with eos), the pipeline's form."""
    ids = self.encode(text)
    if append_eos:
      ids.append(self.eos_id)
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` up to the first eos; pad dropped, sentinels as <extra_id_i>.

    Ids past the sentinels (the rounding to 128) decode as unk, like seqio.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    first_sentinel = self.sp_vocab_size + self.extra_ids - 1
    pieces = []
    for i in ids:
      if i == self.pad_id:
        continue
      if self.sp_vocab_size <= i <= first_sentinel:
        # Decoding pieces (not id runs) keeps the space after a sentinel.
        pieces.append(f"<extra_id_{first_sentinel - i}>")
      else:
        pieces.append(self._sp.id_to_piece(
            i if 0 <= i < self.sp_vocab_size else self.unk_id))
    return self._sp.decode_pieces(pieces)


@functools.lru_cache(maxsize=8)
def _load(path: str) -> Vocabulary:
  return Vocabulary(path)


def resolve_path(vocab_path: str) -> str:
  """"" = the bundled model; a bare file name in switchjax/data/vocab/ (e.g.
  "sentencepiece_2k.model") = that bundled model; anything else a path."""
  if not vocab_path:
    return BUNDLED_VOCAB_PATH
  bundled = os.path.join(os.path.dirname(BUNDLED_VOCAB_PATH), vocab_path)
  if os.sep not in vocab_path and os.path.exists(bundled):
    return bundled
  return os.path.abspath(os.path.expanduser(vocab_path))


def get_vocabulary(config) -> Vocabulary:
  """The vocabulary of `config.data.vocab_path` (see resolve_path)."""
  return _load(resolve_path(config.data.vocab_path))
