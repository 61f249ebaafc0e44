r"""Generates text (or ids) with a workdir's checkpoint.

  python -m switchjax.generate --workdir WD (--prompt TEXT [--prompt TEXT2 ...]
      | --prompts_file F | --prompt_ids 1,2,3) [--max_new_tokens N]
      [--temperature T] [--top_k K] [--seed S] [--step N] [--dropless]

The newest checkpoint (or --step N) decodes in eval mode with a key/value
cache (`switchjax.decoding`): greedy at --temperature 0 (the default), else
sampled (--top_k K keeps the K likeliest ids; --seed fixes the draws). Every
prompt is one row of one batch; rows stop at eos or --max_new_tokens.

Text prompts (--prompt, or one per line of --prompts_file) are encoded with
the run's vocabulary, `<extra_id_i>` as sentinel i: a decoder-only model
continues eos + prompt (eos is the document boundary it was trained with);
an encoder-decoder reads prompt + eos (T5's inputs; a span-corruption model
answers a prompt with sentinels the way it was trained: the text of each
span). --prompt_ids is one prompt given as ids, used as they are, and the
output is ids. The output is one line per prompt on stdout; a summary
(tokens, seconds, tokens/s) goes to stderr.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from switchjax import decoding
from switchjax.data import vocab as vocab_lib


class GenerateError(ValueError):
  """Input that cannot be decoded (one line)."""


def parse_ids(text: str) -> list[int]:
  """'1,2,3' -> [1, 2, 3]."""
  try:
    return [int(x) for x in text.replace(" ", "").split(",") if x]
  except ValueError:
    raise GenerateError(f"--prompt_ids {text!r}: expected comma-separated "
                        "integer ids, e.g. 1,2,3") from None


def read_prompts(prompts: Sequence[str], prompts_file: Optional[str],
                 prompt_ids: Optional[str]) -> tuple[list, bool]:
  """(prompts, as_ids) from exactly one of the three prompt flags."""
  given = [n for n, v in (("--prompt", prompts), ("--prompts_file", prompts_file),
                          ("--prompt_ids", prompt_ids)) if v]
  if len(given) != 1:
    raise GenerateError("give exactly one of --prompt, --prompts_file, "
                        f"--prompt_ids (got {', '.join(given) or 'none'})")
  if prompt_ids:
    return [parse_ids(prompt_ids)], True
  if prompts_file:
    try:
      with open(prompts_file, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
      raise GenerateError(f"--prompts_file {prompts_file}: {e.strerror}") from None
    if not lines:
      raise GenerateError(f"--prompts_file {prompts_file} has no prompts")
    return lines, False
  return list(prompts), False


def encode_prompt(vocab: vocab_lib.Vocabulary, text: str, arch: str) -> list[int]:
  """A text prompt as the ids a model of `arch` reads (module docstring)."""
  ids = vocab.encode_with_sentinels(text)
  if arch == "decoder_only":
    return [vocab.eos_id] + ids
  return ids + [vocab.eos_id]


def generate_lines(workdir: str, prompts: Sequence, as_ids: bool, *,
                   step: Optional[int] = None, max_new_tokens: int = 32,
                   temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                   dropless: bool = False) -> tuple[list[str], str]:
  """(one output line per prompt, the summary line)."""
  from switchjax import score  # pylint: disable=g-import-not-at-top
  config, step, model = score.load_model(workdir, step)
  vocab = vocab_lib.get_vocabulary(config)
  ids = (list(prompts) if as_ids else
         [encode_prompt(vocab, p, config.model.arch) for p in prompts])
  start = time.perf_counter()
  try:
    out = decoding.generate(model, ids, eos_id=vocab.eos_id,
                            max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, seed=seed,
                            dropless=dropless)
  except ValueError as e:
    raise GenerateError(str(e).splitlines()[0]) from None
  seconds = time.perf_counter() - start
  lines = [",".join(str(int(i)) for i in t) if as_ids else vocab.decode(t)
           for t in out.tokens]
  made = sum(len(t) + f for t, f in zip(out.tokens, out.finished))
  summary = (f"step {step} of {workdir}: {len(ids)} prompts, {made} tokens "
             f"in {out.steps} steps, {seconds:.2f} s with compilation "
             f"({made / seconds:.1f} tokens/s)")
  return lines, summary


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from switchjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from switchjax import weights  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    prompts, as_ids = read_prompts(f.prompt, f.prompts_file, f.prompt_ids)
    lines, summary = generate_lines(
        f.workdir, prompts, as_ids, step=f.step,
        max_new_tokens=f.max_new_tokens, temperature=f.temperature,
        top_k=f.top_k, seed=f.seed, dropless=f.dropless)
  except (GenerateError, weights.WeightsError, ckpt_lib.CheckpointError) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  for line in lines:
    print(line)
  print(summary, file=sys.stderr)


def _define_flags() -> None:
  """Flags of the command line only, so that importing this module defines none."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The switchjax workdir to decode with.")
  flags.DEFINE_multi_string("prompt", [], "A text prompt (repeatable).")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
  flags.DEFINE_string("prompt_ids", None, "One prompt as ids, e.g. 1,2,3.")
  flags.DEFINE_integer("max_new_tokens", 32, "Most new tokens per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sampling.")
  flags.DEFINE_integer("top_k", 0, "Sample from the K likeliest ids (0 = all).")
  flags.DEFINE_integer("seed", 0, "Seed of the sampling draws.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("dropless", False, "Dropless MoE decode (see decoding).")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  app.run(main)
