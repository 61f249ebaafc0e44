"""A bundled downstream task: which book of the KJV Bible is this verse from?

`kjv_books` (tfds, array_record, prepared on first use like the corpus)
holds one example per verse of the bundled corpus's 1,189 KJV chapters,
31,102 in all: inputs "<verse text>", targets "<book name>" (66 names:
"Genesis", "1 Kings", "Song of Solomon", ...). Scored by exact match of the
decoded book name (`switchjax.task_eval`).

Splits are by chapter, so no chapter gives verses to two of them: a hash of
the chapter's id puts 80 % of chapters in train, 10 % in validation, 10 % in
test. Every verse's text is also in the pre-training corpus (train split
mostly, with its heading "Genesis 1" just before its first verse): what the
task measures is what fine-tuning adds to that, as with T5's pre-training on
C4 and its downstream tasks. The most frequent book (Psalms) is 8 % of the
verses, the floor a constant answer reaches.
"""
import hashlib

import tensorflow_datasets as tfds

from switchjax.data import corpus

SPLITS = ("train", "validation", "test")
BUCKETS = 10  # chapter hash mod 10: 0 validation, 1 test, else train


def chapter_split(chapter_id: str) -> str:
  digest = hashlib.sha256(chapter_id.encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") % BUCKETS
  return SPLITS[1 + bucket] if bucket < 2 else SPLITS[0]


def examples(split: str):
  """(key, {"inputs": verse, "targets": book}) of a split, in corpus order."""
  for doc in corpus.read_documents():
    if not doc["id"].startswith("kjv/") or chapter_split(doc["id"]) != split:
      continue
    book = doc["id"].split("/")[1]
    body = doc["text"].split("\n\n", 1)[1]  # after the heading "Genesis 1"
    for i, verse in enumerate(body.splitlines()):
      if verse.strip():
        yield f"{doc['id']}:{i + 1}", {"inputs": verse.strip(), "targets": book}


class KjvBooks(tfds.core.GeneratorBasedBuilder):
  """KJV verse -> the name of its book, split by chapter."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From the bundled corpus 1.0.0 (bible-kjv-text 4.38)."}

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({"inputs": text, "targets": text}),
        homepage="https://packages.debian.org/bookworm/bible-kjv-text",
        license="public domain")

  def _split_generators(self, dl_manager):
    del dl_manager  # built from the bundled corpus
    return {split: examples(split) for split in SPLITS}

  def _generate_examples(self, split):  # pylint: disable=arguments-differ
    yield from examples(split)
