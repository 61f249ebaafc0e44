"""Tests of switchjax.data: corpus, vocabulary, span corruption, iterators."""
import collections
import json
import math
import os

import numpy as np
import pytest

from switchjax import data
from switchjax.config_base import base_config
from switchjax.data import corpus
from switchjax.data import span_corruption as sc
from switchjax.data import tfds_corpus

A, B, C, D, E, F, G, H = range(10, 18)
X0, X1, X2 = 8099, 8098, 8097  # sentinels of the bundled 8000-piece vocab
EOS = 1


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A private tfds data_dir; the bundled corpus is prepared there once."""
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds_corpus.bundled_builder(d)
  return d


def make_config(data_dir, arch="encoder_decoder"):
  c = base_config()
  c.model.arch = arch
  c.data.data_dir = data_dir
  c.data.inputs_length = 128
  c.data.targets_length = 29  # random_spans_helper(128, 0.15, 3) -> (141, 29)
  c.data.seq_length = 64
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def uncorrupt(inputs, targets, sentinels):
  """Raw tokens from span-corrupted inputs/targets (eos and pad stripped)."""
  inputs = list(inputs[:list(inputs).index(EOS)])
  targets = list(targets[:list(targets).index(EOS)])
  spans, current = {}, None
  for t in targets:
    if t in sentinels:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  out = []
  for t in inputs:
    out.extend(spans[t] if t in sentinels else [t])
  return out


# --- corpus -----------------------------------------------------------------


def test_corpus_is_real_text_with_a_two_percent_validation_split():
  docs = list(corpus.read_documents())
  ids = [d["id"] for d in docs]
  assert len(set(ids)) == len(ids)
  assert sum(len(d["text"].encode()) for d in docs) > 10e6
  val = [d for d in docs if corpus.is_validation(d["id"])]
  assert 0.01 < len(val) / len(docs) < 0.03
  assert [d["id"] for d in corpus.read_documents("validation")] == [
      d["id"] for d in val]
  genesis = next(d for d in docs if d["id"] == "kjv/Genesis/1")
  assert "In the beginning God created the heaven and the earth." in genesis["text"]
  with pytest.raises(ValueError, match="unknown split"):
    next(corpus.read_documents("test"))


def test_tfds_builder_serves_the_corpus(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  sources = tfds.data_source("switchjax_corpus", data_dir=data_dir,
                             download=False)
  for split in corpus.SPLITS:
    expected = {d["text"] for d in corpus.read_documents(split)}
    got = {sources[split][i]["text"].decode() for i in range(len(sources[split]))}
    assert got == expected


# --- vocabulary -------------------------------------------------------------


def test_vocabulary_ids_and_sentinels(data_dir):
  vocab = data.get_vocabulary(make_config(data_dir))
  assert (vocab.pad_id, vocab.eos_id, vocab.sp_vocab_size) == (0, 1, 8000)
  assert vocab.vocab_size == 8192  # 8000 + 100 rounded up to 128
  assert vocab.sentinel_id(0) == X0 and vocab.sentinel_id(99) == 8000
  ids = vocab.encode("light") + [X0] + vocab.encode(" and dark") + [X1, EOS, 5]
  assert vocab.decode(ids) == "light<extra_id_0> and dark<extra_id_1>"
  with pytest.raises(ValueError, match="sentinel index"):
    vocab.sentinel_id(100)


def test_vocabulary_round_trips_real_text(data_dir):
  vocab = data.get_vocabulary(make_config(data_dir))
  for doc in list(corpus.read_documents("validation"))[:10]:
    text = " ".join(doc["text"].split())  # SentencePiece folds whitespace runs
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # real subwords, not bytes
  odd = "naïve café, Σ — 漢字 🙂"  # rare characters go through byte fallback
  assert vocab.decode(vocab.encode(odd)) == odd
  assert vocab.unk_id not in vocab.encode(odd)


def test_vocab_path_must_exist(data_dir):
  c = make_config(data_dir)
  c.data.vocab_path = os.path.join(data_dir, "missing.model")
  with pytest.raises(ValueError, match="SentencePiece model not found"):
    data.get_vocabulary(c)


# --- span corruption --------------------------------------------------------


def test_span_corruption_hand_worked_example():
  tokens = np.array([A, B, C, D, E, F, G, H])
  mask = np.array([0, 1, 1, 0, 0, 1, 1, 0], dtype=bool)
  inputs, targets = sc.span_corruption_with_mask(
      tokens, mask, first_sentinel_id=X0, eos_id=EOS)
  assert inputs.tolist() == [A, X0, D, E, X1, H, EOS]
  assert targets.tolist() == [X0, B, C, X1, F, G, X2, EOS]
  # T5's masks end on a noise span: then both sides use the same sentinels.
  mask = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
  inputs, targets = sc.span_corruption_with_mask(
      tokens[:6], mask, first_sentinel_id=X0, eos_id=EOS)
  assert inputs.tolist() == [A, B, X0, E, X1, EOS]
  assert targets.tolist() == [X0, C, D, X1, F, EOS]


@pytest.mark.parametrize("length,noise,spans", [(568, 85, 28), (100, 15, 5),
                                                (141, 21, 7)])
def test_noise_mask_density_and_span_count(length, noise, spans):
  masks = []
  for seed in range(20):
    m = sc.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
    assert m.shape == (length,) and m.dtype == bool
    assert m.sum() == noise  # round(length * 0.15)
    starts = np.flatnonzero(m & ~np.concatenate([[False], m[:-1]]))
    assert len(starts) == spans  # round(noise / 3)
    assert not m[0] and m[-1]  # non-noise first, noise last
    masks.append(m)
  assert len({m.tobytes() for m in masks}) == 20
  again = sc.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(0))
  np.testing.assert_array_equal(again, masks[0])


def test_random_spans_helper_matches_t5():
  assert sc.random_spans_helper(512, 0.15, 3.0) == (568, 114)
  tokens = np.arange(100, 100 + 568)
  inputs, targets = sc.span_corruption(
      tokens, np.random.default_rng(0), noise_density=0.15,
      mean_noise_span_length=3.0, first_sentinel_id=X0, eos_id=EOS)
  assert (len(inputs), len(targets)) == (512, 114)
  # One more raw token would overflow 512 inputs.
  raw, _ = sc.random_spans_helper(128, 0.15, 3.0)
  for n, fits in ((raw, True), (raw + 1, False)):
    noise = round(n * 0.15)
    assert (n - noise + round(noise / 3) + 1 <= 128) == fits


# --- iterators --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_feature_shapes_and_dtypes(data_dir, arch):
  batch = next(data.make_iterator(make_config(data_dir, arch), "train",
                                  batch_size=4))
  if arch == "encoder_decoder":
    enc, dec = 128, 29
    assert batch["encoder_input_tokens"].shape == (4, enc)
    assert batch["encoder_input_tokens"].dtype == np.int32
  else:
    dec = 64
    assert "encoder_input_tokens" not in batch
  for k in ("decoder_input_tokens", "decoder_target_tokens"):
    assert batch[k].shape == (4, dec) and batch[k].dtype == np.int32
  assert batch["decoder_loss_weights"].shape == (4, dec)
  assert batch["decoder_loss_weights"].dtype == np.float32
  targets = batch["decoder_target_tokens"]
  np.testing.assert_array_equal(batch["decoder_loss_weights"], targets != 0)
  if arch == "encoder_decoder":  # t5x: targets shifted right, starting at 0
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], 0)
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:],
                                  targets[:, :-1])
    # Full raw segments: exactly 128 inputs and 29 targets, eos last.
    np.testing.assert_array_equal(batch["encoder_input_tokens"][:, -1], EOS)
    np.testing.assert_array_equal(targets[:, -1], EOS)
  else:
    np.testing.assert_array_equal(batch["decoder_loss_weights"], 1.0)


def _stream(config, docs, append_eos):
  vocab = data.get_vocabulary(config)
  return np.concatenate([vocab.encode_np(d["text"], append_eos) for d in docs])


def _validation_docs(config, shard=slice(None)):
  src = tfds_corpus.data_source("bundled", "validation", config.data.data_dir)
  return [{"text": src[i]["text"]} for i in range(len(src))][shard]


def test_decoder_only_packs_documents_with_eos_and_cycles(data_dir):
  c = make_config(data_dir, "decoder_only")
  batches = take(data.make_iterator(c, "validation", batch_size=32), 40)
  # Each row is one chunk of seq_length + 1 tokens: inputs then the last target.
  chunks = [np.concatenate([x, y[-1:]]) for b in batches for x, y in
            zip(b["decoder_input_tokens"], b["decoder_target_tokens"])]
  got = np.concatenate(chunks)
  one_epoch = _stream(c, _validation_docs(c), append_eos=True)
  assert len(got) > len(one_epoch)  # 40 batches run past one epoch
  expected = np.concatenate([one_epoch, one_epoch])[:len(got)]
  np.testing.assert_array_equal(got, expected)


def test_span_corruption_stream_reassembles_to_the_documents(data_dir):
  c = make_config(data_dir, "encoder_decoder")
  vocab = data.get_vocabulary(c)
  sentinels = {vocab.sentinel_id(i) for i in range(100)}
  batches = take(data.make_iterator(c, "validation", batch_size=8), 4)
  raw = []
  for b in batches:
    for inputs, targets in zip(b["encoder_input_tokens"],
                               b["decoder_target_tokens"]):
      used = [t for t in targets if t in sentinels]
      assert used == [vocab.sentinel_id(i) for i in range(len(used))]
      assert [t for t in inputs if t in sentinels] == used
      segment = uncorrupt(inputs, targets, sentinels)
      assert len(segment) == 141
      raw.extend(segment)
  # T5 concatenates documents without eos before cutting raw segments.
  expected = _stream(c, _validation_docs(c), append_eos=False)[:len(raw)]
  np.testing.assert_array_equal(raw, expected)


def test_eval_iterators_repeat_the_same_batches(data_dir):
  c = make_config(data_dir, "encoder_decoder")
  first = take(data.make_iterator(c, "validation", batch_size=4), 3)
  second = take(data.make_iterator(c, "validation", batch_size=4), 3)
  assert_batches_equal(first, second)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_train_iterator_is_deterministic_and_seeded(data_dir, arch):
  c = make_config(data_dir, arch)
  first = take(data.make_iterator(c, "train", batch_size=4), 3)
  assert_batches_equal(first, take(data.make_iterator(c, "train", batch_size=4), 3))
  c.data.shuffle_seed = 1
  other = next(data.make_iterator(c, "train", batch_size=4))
  assert not np.array_equal(other["decoder_target_tokens"],
                            first[0]["decoder_target_tokens"])


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_resume_from_saved_state_continues_the_stream(data_dir, arch):
  c = make_config(data_dir, arch)
  it = data.make_iterator(c, "train", batch_size=4)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  expected = take(it, 6)
  resumed = data.make_iterator(c, "train", batch_size=4)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)


def test_hosts_read_disjoint_shards(data_dir):
  c = make_config(data_dir, "decoder_only")
  docs = _validation_docs(c)
  streams = []
  for host in range(2):
    it = data.make_iterator(c, "validation", batch_size=4, process_index=host,
                            process_count=2)
    b = take(it, 3)
    got = np.concatenate([np.concatenate([x, y[-1:]]) for bb in b for x, y in
                          zip(bb["decoder_input_tokens"],
                              bb["decoder_target_tokens"])])
    # Host h reads documents h, h + 2, h + 4, ... of the split.
    expected = _stream(c, docs[host::2], append_eos=True)[:len(got)]
    np.testing.assert_array_equal(got, expected)
    streams.append(got)
  assert not np.array_equal(streams[0], streams[1])


def test_any_prepared_tfds_name_goes_through_the_same_pipeline(data_dir):
  # The generic path (tfds.builder + threaded reads), as C4 takes it.
  c = make_config(data_dir, "encoder_decoder")
  bundled = take(data.make_iterator(c, "train", batch_size=4), 2)
  c.data.name = "switchjax_corpus:1.0.0"
  assert_batches_equal(take(data.make_iterator(c, "train", batch_size=4), 2),
                       bundled)


def test_c4_absent_raises_one_line_error(tmp_path):
  c = make_config(str(tmp_path), "encoder_decoder")
  c.data.name = "c4/en:3.1.0"
  with pytest.raises(ValueError, match=r"'c4/en:3.1.0' is not prepared") as e:
    data.make_iterator(c, "train", batch_size=2)
  assert "\n" not in str(e.value)
  assert "tfds build c4/en:3.1.0" in str(e.value)
  assert "data_dir" in str(e.value)
  assert not os.listdir(tmp_path)  # nothing written on the way


def test_bad_inputs_raise_value_errors(data_dir):
  # Config lengths and arch are validate.prepare's (tests/test_validate.py).
  c = make_config(data_dir, "decoder_only")
  with pytest.raises(ValueError, match="no split 'test'"):
    data.make_iterator(c, "test", batch_size=2)
  with pytest.raises(ValueError, match="process_index 2"):
    data.make_iterator(c, "train", batch_size=2, process_index=2,
                       process_count=2)


def test_unigram_entropy(data_dir):
  c = make_config(data_dir)
  vocab = data.get_vocabulary(c)
  counts = collections.Counter()
  for d in corpus.read_documents("validation"):
    counts.update(vocab.encode(d["text"]) + [vocab.eos_id])
  n = sum(counts.values())
  expected = sum(k / n * math.log(n / k) for k in counts.values())
  assert data.unigram_entropy(c) == pytest.approx(expected, rel=1e-9)
  assert 4.0 < expected < math.log(vocab.sp_vocab_size)



@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_eval_set_is_the_same_for_every_seed(data_dir, arch):
  """Seeds of one experiment are scored on the same targets (train noise differs)."""
  c0, c1 = make_config(data_dir, arch), make_config(data_dir, arch)
  c1.seed = 1
  assert_batches_equal(take(data.make_iterator(c0, "validation", batch_size=8), 3),
                       take(data.make_iterator(c1, "validation", batch_size=8), 3))
  if arch == "encoder_decoder":  # the training noise still follows the seed
    t0 = next(data.make_iterator(c0, "train", batch_size=8))
    t1 = next(data.make_iterator(c1, "train", batch_size=8))
    assert not np.array_equal(t0["encoder_input_tokens"], t1["encoder_input_tokens"])
    c1.data.shuffle_seed = 1  # the eval noise follows the data's seed
    v0 = next(data.make_iterator(c0, "validation", batch_size=8))
    v1 = next(data.make_iterator(c1, "validation", batch_size=8))
    assert not np.array_equal(v0["encoder_input_tokens"], v1["encoder_input_tokens"])
