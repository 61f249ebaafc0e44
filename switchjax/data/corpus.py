"""The bundled corpus: KJV Bible chapters and Python 3.11 documentation.

corpus/corpus.jsonl.xz holds one {"id", "text"} record per document, built by
scripts/build_corpus.py from Debian packages (sources and licences in
corpus/README.md). The validation split is ~2% of documents chosen by a hash of
their id, so it never changes when documents are added or reordered.
"""
import hashlib
import json
import lzma
import os
from collections.abc import Iterator

CORPUS_PATH = os.path.join(os.path.dirname(__file__), "corpus", "corpus.jsonl.xz")
SPLITS = ("train", "validation")
VALIDATION_BUCKETS = 50  # 1 bucket of 50 -> 2% of documents


def is_validation(doc_id: str) -> bool:
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % VALIDATION_BUCKETS == 0


def read_documents(split: str | None = None,
                   path: str = CORPUS_PATH) -> Iterator[dict[str, str]]:
  """Yields {"id", "text"} records in file order; split=None gives all."""
  if split is not None and split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; the bundled corpus has {SPLITS}")
  with lzma.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      if split is None or is_validation(doc["id"]) == (split == "validation"):
        yield doc
