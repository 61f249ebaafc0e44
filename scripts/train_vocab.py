#!/usr/bin/env python3
"""Trains the bundled SentencePiece vocabulary on the corpus train split.

Writes switchjax/data/vocab/sentencepiece.{model,vocab}: a unigram model of
8000 pieces with byte fallback and T5's special ids (pad 0, eos 1, unk 2, no
bos). The 100 T5 sentinels are not part of it: switchjax.data.vocab appends
them after the SentencePiece ids, as T5's `extra_ids` do.

  python scripts/train_vocab.py [--vocab_size 8000]
"""
import argparse
import os
import sys

import sentencepiece as spm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from switchjax.data import corpus  # pylint: disable=g-import-not-at-top


def train_lines():
  """Non-empty lines of the train documents: SentencePiece trains on lines."""
  for doc in corpus.read_documents("train"):
    for line in doc["text"].split("\n"):
      if line.strip():
        yield line


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--out_prefix", default=os.path.join(
      REPO, "switchjax", "data", "vocab", "sentencepiece"))
  args = parser.parse_args(argv)
  os.makedirs(os.path.dirname(args.out_prefix), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=train_lines(),
      model_prefix=args.out_prefix,
      model_type="unigram",
      vocab_size=args.vocab_size,
      byte_fallback=True,
      character_coverage=0.9995,
      # T5's convention: pad 0 (also the decoder's start id), eos 1, unk 2.
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      # One thread and every sentence: the same corpus gives the same model.
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      max_sentence_length=16384,
      minloglevel=1,
  )
  sp = spm.SentencePieceProcessor(model_file=args.out_prefix + ".model")
  print(f"wrote {args.out_prefix}.model: {sp.get_piece_size()} pieces",
        file=sys.stderr)


if __name__ == "__main__":
  main()
