"""Data: bundled corpus (tfds), C4 via tfds, SentencePiece + T5 sentinels,
span corruption and packing, checkpointable grain iterators.

  vocab = get_vocabulary(config)
  it = make_iterator(config, "train", batch_size=B // jax.process_count(),
                     process_index=jax.process_index(),
                     process_count=jax.process_count())
  batch = next(it)            # dict[str, np.ndarray], see pipeline.py
  state = it.get_state()      # save with the checkpoint; it.set_state(state)
"""
from switchjax.data.entropy import unigram_entropy
from switchjax.data.pipeline import is_task_data
from switchjax.data.pipeline import make_dataset
from switchjax.data.pipeline import make_iterator
from switchjax.data.pipeline import num_batches
from switchjax.data.vocab import get_vocabulary
from switchjax.data.vocab import Vocabulary

__all__ = ["Vocabulary", "get_vocabulary", "is_task_data", "make_dataset",
           "make_iterator",
           "num_batches", "unigram_entropy"]
