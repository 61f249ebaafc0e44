"""Decoding (switchjax.decoding) and its command line (switchjax.generate):
cached decoding equals recomputing the prefix, for both architectures, dense
and sparse; prompts are forced, eos and max_new_tokens stop rows."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from switchjax import decoding
from switchjax import generate
from switchjax import model as model_lib
from switchjax.data import vocab as vocab_lib

from test_train import load, short

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 1


def small(name, preset="tiny", arch=None, **moe):
  c = short(load(os.path.join(ROOT, "experiments", f"{name}.py"), preset))
  c.model.vocab_size = 256
  if arch:
    c.model.arch = arch
  for k, v in moe.items():
    c.moe[k] = v
  return c


def mistral_blocks():
  """Mixtral's tiny preset with a window shorter than the decode, one
  key/value head for the two query heads: RoPE, GQA and the window cached."""
  c = small("mixtral")
  c.model.attention_window = 4
  c.model.num_kv_heads = 1
  return c


MODELS = {
    # name: config; decoder-only and encoder-decoder, dense and sparse
    # (top-1, top-2, hash routing; expert choice and Soft MoE in the encoder;
    # Mixtral's blocks).
    "decoder_only_dense": lambda: small("t5_base", arch="decoder_only"),
    "decoder_only_switch": lambda: small("switch_base", arch="decoder_only"),
    "decoder_only_top2": lambda: small("gshard", arch="decoder_only"),
    "encoder_decoder_dense": lambda: small("t5_base"),
    "encoder_decoder_switch": lambda: small("switch_base"),
    "encoder_decoder_expert_choice": lambda: small("expert_choice"),
    "decoder_only_hash": lambda: small("switch_base", arch="decoder_only",
                                       router="hash"),
    "encoder_decoder_soft": lambda: small("switch_base", encoder_router="soft"),
    "decoder_only_mixtral": mistral_blocks,
}


def build(config, seed=0):
  model = model_lib.build_model(config, rngs=nnx.Rngs(seed))
  model.eval()
  return model


@nnx.jit
def forward(model, tokens):
  """The plain (uncached) forward pass: logits f32[B, L, V]."""
  return model(tokens)[0]


def prompts(n_rows=3, lengths=(5, 1, 9), seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(3, 256, size=n)) for n in lengths[:n_rows]]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_decoding_equals_recomputing_the_prefix(name):
  model = build(MODELS[name]())
  ps = prompts()
  kw = dict(eos_id=EOS, max_new_tokens=6, dropless=True, return_logits=True)
  cached = decoding.generate(model, ps, **kw)
  full = decoding.generate(model, ps, cache=False, **kw)
  assert cached.steps == full.steps
  for a, b in zip(cached.tokens, full.tokens):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(cached.logits, full.logits, atol=2e-5, rtol=1e-5)
  # Not vacuous: the rows differ, and the logits are the model's.
  assert any(not np.array_equal(cached.tokens[0], t) for t in cached.tokens[1:])
  assert np.abs(cached.logits).max() > 0.1


def test_prompt_positions_score_like_a_plain_forward_pass():
  """Independent of the decode loop: a decoder-only model's logits at the
  prompt's positions are those of model(prompt)."""
  model = build(MODELS["decoder_only_switch"]())
  ps = prompts()
  out = decoding.generate(model, ps, eos_id=EOS, max_new_tokens=2,
                          dropless=True, return_logits=True)
  for i, p in enumerate(ps):
    want = forward(model, np.asarray([p], np.int32))
    np.testing.assert_allclose(out.logits[i, :len(p)], np.asarray(want)[0],
                               atol=2e-5, rtol=1e-5)


def test_greedy_continuation_and_eos():
  model = build(MODELS["decoder_only_dense"]())
  ps = prompts()
  free = decoding.generate(model, ps, eos_id=EOS, max_new_tokens=5)
  assert [len(t) for t in free.tokens] == [5, 5, 5]
  assert free.finished == [False] * 3
  # Greedy: the first new token is the argmax after the prompt.
  for p, t in zip(ps, free.tokens):
    logits = forward(model, np.asarray([p], np.int32))
    assert t[0] == int(np.argmax(np.asarray(logits)[0, -1]))
  # Make row 0's third token the eos: it stops there, the others run on
  # (unless they meet that id too).
  eos = int(free.tokens[0][2])
  out = decoding.generate(model, ps, eos_id=eos, max_new_tokens=5)
  np.testing.assert_array_equal(out.tokens[0], free.tokens[0][:2])
  assert out.finished[0]
  for i in (1, 2):
    cut = list(free.tokens[i]).index(eos) if eos in free.tokens[i] else 5
    np.testing.assert_array_equal(out.tokens[i], free.tokens[i][:cut])
  # Every row done: the loop ends early.
  short_run = decoding.generate(model, [ps[0]], eos_id=eos, max_new_tokens=5)
  assert short_run.steps == len(ps[0]) + 2


def test_sampling():
  model = build(MODELS["decoder_only_switch"]())
  ps = prompts()
  greedy = decoding.generate(model, ps, eos_id=EOS, max_new_tokens=6)
  top1 = decoding.generate(model, ps, eos_id=EOS, max_new_tokens=6,
                           temperature=1.0, top_k=1, seed=3)
  for a, b in zip(greedy.tokens, top1.tokens):
    np.testing.assert_array_equal(a, b)  # top-1 sampling is greedy
  draws = [decoding.generate(model, ps, eos_id=EOS, max_new_tokens=6,
                             temperature=2.0, seed=s).tokens for s in (0, 0, 1)]
  for a, b in zip(draws[0], draws[1]):
    np.testing.assert_array_equal(a, b)  # same seed, same draws
  assert any(not np.array_equal(a, b) for a, b in zip(draws[0], draws[2]))


def test_padded_rows():
  assert decoding.padded_rows(3, 10, 0) == 3
  assert decoding.padded_rows(3, 10, 64) == 3  # 30 tokens: one group
  assert decoding.padded_rows(8, 16, 64) == 8  # 128 = 2 groups of 64
  assert decoding.padded_rows(5, 16, 64) == 8  # 80 -> 128 (4 rows a group)
  assert decoding.padded_rows(5, 10, 64) == 5  # 50 tokens: one group
  assert decoding.padded_rows(7, 10, 64) == 32  # 64 / gcd(64, 10) = 32


def test_encoder_groups_that_do_not_divide_get_padded_rows():
  config = small("switch_base")
  # 5 prompts of 10 (16 with the length bucket): 80 tokens, not 64 * k;
  # run as 8 rows.
  config.moe.group_size = 64
  model = build(config)
  ps = prompts(5, (10,) * 5)
  out = decoding.generate(model, ps, eos_id=EOS, max_new_tokens=3,
                          dropless=True)
  assert len(out.tokens) == 5 and all(len(t) == 3 for t in out.tokens)


@pytest.mark.parametrize("bad,message", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[3, 999]]), r"prompt 0 has ids outside \[0, 256\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
])
def test_bad_requests_are_refused(bad, message):
  model = build(MODELS["decoder_only_dense"]())
  kw = dict(prompts=[[3, 4]], eos_id=EOS, max_new_tokens=2)
  kw.update(bad)
  with pytest.raises(ValueError, match=message):
    decoding.generate(model, kw.pop("prompts"), **kw)


@pytest.fixture
def workdir(switch_run):
  """A switch_base run trained 2 steps, with the bundled vocabulary."""
  return switch_run


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "switchjax.generate", *args],
                        capture_output=True, text=True, cwd=ROOT, check=False)


def test_command_line(workdir, tmp_path):
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("In the beginning <extra_id_0> the earth.\n\n"
                          "The os module\n")
  r = run_cli("--workdir", workdir, "--prompts_file", str(prompts_file),
              "--max_new_tokens", "4")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 2  # one per prompt; the blank line is none
  assert f"step 2 of {workdir}: 2 prompts" in r.stderr
  r = run_cli("--workdir", workdir, "--prompt_ids", "5,6,7,1",
              "--max_new_tokens", "3")
  assert r.returncode == 0, r.stderr
  (line,) = r.stdout.splitlines()
  ids = [int(x) for x in line.split(",") if x]
  assert len(ids) <= 3 and all(0 <= i < 8192 for i in ids)
  # Bad input: one line, exit 1.
  r = run_cli("--workdir", workdir, "--prompt_ids", "1", "--step", "7")
  assert r.returncode == 1
  assert r.stderr.startswith("error: step 7 is not in"), r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_prompt_flags(tmp_path):
  with pytest.raises(generate.GenerateError, match=re.escape(
      "give exactly one of --prompt, --prompts_file, --prompt_ids (got "
      "--prompt, --prompt_ids)")):
    generate.read_prompts(["a"], None, "1")
  with pytest.raises(generate.GenerateError, match="got none"):
    generate.read_prompts([], None, None)
  with pytest.raises(generate.GenerateError,
                     match="--prompt_ids '1,x': expected comma-separated"):
    generate.read_prompts([], None, "1,x")
  assert generate.read_prompts([], None, "1, 2,3") == ([[1, 2, 3]], True)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(generate.GenerateError, match="has no prompts"):
    generate.read_prompts([], str(empty), None)
  with pytest.raises(generate.GenerateError, match="No such file"):
    generate.read_prompts([], str(tmp_path / "missing.txt"), None)


def test_text_prompts_take_sentinels_and_boundaries():
  vocab = vocab_lib.Vocabulary(vocab_lib.BUNDLED_VOCAB_PATH)
  ids = generate.encode_prompt(vocab, "the <extra_id_0> earth",
                               "encoder_decoder")
  assert ids == (vocab.encode("the") + [vocab.sentinel_id(0)]
                 + vocab.encode("earth") + [vocab.eos_id])
  assert generate.encode_prompt(vocab, "the earth", "decoder_only") == (
      [vocab.eos_id] + vocab.encode("the earth"))
