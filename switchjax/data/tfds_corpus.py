"""tensorflow-datasets builder for the bundled corpus, and tfds data sources.

`switchjax_corpus` is prepared from the package's corpus file into the tfds
data_dir as array_record on first use (about a second) and read back with
random access (`as_data_source`), which needs no TensorFlow. Any other tfds
name (e.g. "c4/en:3.1.0") must already be prepared in array_record format.
"""
import contextlib
import fcntl
import os

import tensorflow_datasets as tfds

from switchjax.data import corpus
from switchjax.data import kjv_books

BUNDLED_NAMES = ("bundled", "switchjax_corpus")
# Text-to-text tasks built from the corpus: examples {"inputs", "targets"}.
BUNDLED_TASKS = {"kjv_books": kjv_books.KjvBooks}


class SwitchjaxCorpus(tfds.core.GeneratorBasedBuilder):
  """KJV Bible chapters and Python 3.11 documentation sections, one per example."""

  # Bump when corpus/corpus.jsonl.xz changes: prepared copies are keyed by it.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "KJV (bible-kjv-text 4.38) + python3.11-doc 3.11.2."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        homepage="https://packages.debian.org/bookworm/python3.11-doc",
        license="KJV: public domain; Python docs: PSF License Version 2",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with the package
    return {split: self._generate_examples(split) for split in corpus.SPLITS}

  def _generate_examples(self, split):
    for doc in corpus.read_documents(split):
      yield doc["id"], {"text": doc["text"]}


@contextlib.contextmanager
def _lock(path: str):
  """Exclusive lock on a local file, so concurrent processes build once."""
  if "://" in path:  # remote data_dir: no flock there
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def bundled_builder(data_dir: str | None, cls=SwitchjaxCorpus
                    ) -> tfds.core.GeneratorBasedBuilder:
  """A bundled dataset's builder (the corpus, or a task of BUNDLED_TASKS),
  prepared (array_record) in data_dir."""
  builder = cls(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    with _lock(os.fspath(builder.data_dir) + ".lock"):
      builder = cls(data_dir=data_dir, file_format="array_record")
      if not builder.is_prepared():
        builder.download_and_prepare(
            # Nothing to download; never ask GCS for a prepared copy.
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False))
        builder = cls(data_dir=data_dir, file_format="array_record")
  return builder


def _not_prepared(name: str, data_dir: str | None, why: str) -> ValueError:
  where = data_dir or "the tfds default data_dir (~/tensorflow_datasets)"
  return ValueError(
      f"tfds dataset {name!r} is not prepared in {where} ({why}); prepare it "
      f"there with `tfds build {name} --data_dir=DIR --file_format=array_record`"
      " (C4 needs the Common Crawl download and Apache Beam), or set "
      "--config.data.data_dir to a directory or gs:// bucket that holds it in "
      "array_record format")


def data_source(name: str, split: str, data_dir: str | None):
  """Random-access source of examples for one split: dicts with 'text' (a
  corpus) or with 'inputs' and 'targets' (a text-to-text task)."""
  if name in BUNDLED_NAMES:
    builder = bundled_builder(data_dir)
  elif name in BUNDLED_TASKS:
    builder = bundled_builder(data_dir, BUNDLED_TASKS[name])
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types; all mean "not there"
      raise _not_prepared(name, data_dir, type(e).__name__) from e
    if not builder.is_prepared():
      raise _not_prepared(name, data_dir, f"no data at {builder.data_dir}")
    fmt = builder.info.file_format
    if fmt is None or fmt.value not in ("array_record", "parquet"):
      raise _not_prepared(name, data_dir, f"prepared as {fmt}, which has no "
                          "random access")
  if split not in builder.info.splits:
    raise ValueError(f"dataset {name!r} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits.keys())}")
  return builder.as_data_source(split=split)
