"""The bundled downstream task (kjv_books), its features, exact match, and the
fine-tuning config that trains on it from a pre-trained run."""
import collections
import json
import os

import numpy as np
import pytest

from switchjax import decoding
from switchjax import exact_match as exact_match_lib
from switchjax import train
from switchjax.data import kjv_books
from switchjax.data import pipeline
from switchjax.data import vocab as vocab_lib

from conftest import experiment
from test_train import read_metrics, short

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "experiments", "finetune", "kjv_books.py")


def test_splits_share_no_chapter_and_hold_every_verse():
  chapters = collections.defaultdict(set)
  counts = collections.Counter()
  books = set()
  for split in kjv_books.SPLITS:
    for key, ex in kjv_books.examples(split):
      chapters[split].add(key.rsplit(":", 1)[0])
      counts[split] += 1
      books.add(ex["targets"])
  assert sum(counts.values()) == 31102  # the KJV's verses
  assert len(books) == 66
  a, b, c = (chapters[s] for s in kjv_books.SPLITS)
  assert not (a & b or a & c or b & c)
  assert len(a | b | c) == 1189
  # Roughly 80 / 10 / 10 by chapter.
  assert 0.07 < len(b) / 1189 < 0.13 and 0.07 < len(c) / 1189 < 0.13
  # By hand: Genesis 1 falls in test (its hash), its first verse first.
  key, first = next(kjv_books.examples("test"))
  assert key == "kjv/Genesis/1:1"
  assert first == {"inputs": "In the beginning God created the heaven and "
                             "the earth.", "targets": "Genesis"}


def test_task_features_by_hand():
  vocab = vocab_lib.Vocabulary(vocab_lib.BUNDLED_VOCAB_PATH)
  ex = {"inputs": b"And God said", "targets": b"1 Kings"}
  verse, book = vocab.encode("And God said"), vocab.encode("1 Kings")
  kw = dict(vocab=vocab, inputs_length=8, targets_length=6, seq_length=12)
  ed = pipeline._task_features(ex, arch="encoder_decoder", **kw)
  want_targets = book + [vocab.eos_id]
  np.testing.assert_array_equal(
      ed["encoder_input_tokens"],
      np.pad(verse + [vocab.eos_id], (0, 8 - len(verse) - 1)))
  np.testing.assert_array_equal(
      ed["decoder_target_tokens"], np.pad(want_targets, (0, 6 - len(want_targets))))
  np.testing.assert_array_equal(ed["decoder_input_tokens"][1:len(want_targets)],
                                want_targets[:-1])
  assert ed["decoder_input_tokens"][0] == 0
  np.testing.assert_array_equal(ed["decoder_loss_weights"],
                                np.arange(6) < len(want_targets))

  do = pipeline._task_features(ex, arch="decoder_only", **kw)
  seq = [vocab.eos_id] + verse + [vocab.sentinel_id(0)] + book + [vocab.eos_id]
  seq = np.pad(seq, (0, 13 - len(seq)))
  np.testing.assert_array_equal(do["decoder_input_tokens"], seq[:-1])
  np.testing.assert_array_equal(do["decoder_target_tokens"], seq[1:])
  # The loss is on the answer and its eos only: the targets after the separator.
  answer_start = len(verse) + 1  # target index of the answer's first id
  want = np.zeros(12)
  want[answer_start:answer_start + len(book) + 1] = 1
  np.testing.assert_array_equal(do["decoder_loss_weights"], want)
  # A verse too long for the row is cut, keeping the separator and answer.
  long = {"inputs": " ".join(["God"] * 40), "targets": "Genesis"}
  cut = pipeline._task_features(long, arch="decoder_only", **kw)
  ids = list(cut["decoder_input_tokens"]) + [cut["decoder_target_tokens"][-1]]
  tail = [vocab.sentinel_id(0)] + vocab.encode("Genesis") + [vocab.eos_id]
  assert ids[-len(tail):] == tail


def test_exact_match_compares_decoded_text(monkeypatch):
  """With the decoder replaced by one that answers every other row right."""
  config = experiment("switch_base", "tiny")
  config.data.name = "kjv_books"
  vocab = vocab_lib.get_vocabulary(config)
  from switchjax.data import tfds_corpus
  source = tfds_corpus.data_source("kjv_books", "validation", None)

  def fake_generate(model, prompts, **kw):
    del model, kw
    tokens = []
    for i, p in enumerate(prompts):
      row = source[fake_generate.seen + i]
      assert p == pipeline.task_ids(vocab, row["inputs"].decode(),
                                    "encoder_decoder")
      answer = row["targets"].decode() if i % 2 == 0 else "Nobody"
      tokens.append(np.asarray(vocab.encode(answer)))
    fake_generate.seen += len(prompts)
    return decoding.Decoded(tokens=tokens, finished=[True] * len(tokens),
                            steps=1)
  fake_generate.seen = 0
  monkeypatch.setattr(decoding, "generate", fake_generate)
  got = exact_match_lib.exact_match(None, config, "validation", examples=100)
  assert got == {"exact_match": 0.5, "examples": 100}  # 50 right of 100


@pytest.mark.parametrize("arg,name,init_from", [
    ("tiny", "switch_base", "runs/switch_base-tiny"),
    ("t5_base,tiny", "t5_base", "runs/t5_base-tiny"),
    ("switch_large", "switch_large", ""),
])
def test_finetune_config_is_the_recipe(arg, name, init_from):
  c = experiment(FINETUNE, arg)
  base = experiment(name, arg.partition(",")[2] or ("tiny" if arg == "tiny" else None))
  assert c.train.init_from == init_from
  assert c.data.name == "kjv_books"
  assert (c.model.dropout_rate, c.moe.expert_dropout) == (0.1, 0.4)
  assert c.train.schedule == "constant"
  assert c.train.learning_rate == (3e-3 if "tiny" in arg else 1e-3)
  assert c.model.d_model == base.model.d_model  # the pre-trained shape
  assert c.moe.num_experts == base.moe.num_experts
  assert c.moe.train_capacity_factor == base.moe.train_capacity_factor


def test_finetuning_a_pretrained_run_reports_exact_match(switch_run, tmp_path):
  pretrained = switch_run
  c = short(experiment(FINETUNE, "tiny"), steps=2)
  c.data.inputs_length, c.data.targets_length = 64, 8
  c.train.init_from = pretrained
  c.train.eval_steps = 2
  c.data.exact_match_examples = 8
  workdir = str(tmp_path / "finetuned")
  train.train_and_evaluate(c, workdir)
  (ev,) = [r for r in read_metrics(workdir) if r.get("split") == "eval"]
  assert 0.0 <= ev["exact_match"] <= 1.0 and ev["tokens"] > 0
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["init_from"] == pretrained


def test_train_examples_cuts_the_task_to_its_first_verses():
  """A small task: every training row comes from the first N verses (in the
  encoder the verse is the whole input), and a corpus is refused."""
  from switchjax import validate
  from switchjax.data import tfds_corpus
  config = experiment("switch_base", "tiny")
  config.data.name, config.data.train_examples = "kjv_books", 5
  config.data.inputs_length = 128
  vocab = vocab_lib.get_vocabulary(config)
  source = tfds_corpus.data_source("kjv_books", "train", None)
  first = {tuple(pipeline.task_ids(vocab, source[i]["inputs"].decode(),
                                   "encoder_decoder")) for i in range(5)}
  it = iter(pipeline.make_dataset(config, "train", batch_size=4))
  seen = set()
  for _ in range(5):  # 20 rows: four passes over the five
    for row in next(it)["encoder_input_tokens"]:
      seen.add(tuple(int(t) for t in row if t))
  assert seen == first
  config.data.name = "bundled"
  with pytest.raises(validate.ConfigError, match="data.train_examples=5"):
    validate.prepare(config)
