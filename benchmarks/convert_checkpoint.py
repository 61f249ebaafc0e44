"""Time and peak memory of `switchjax.convert` on a full-size checkpoint.

  python -m benchmarks.convert_checkpoint [--experts 8] [--dtype bfloat16]
      [--dir /tmp/convert_bench]

Writes a random Hugging Face Switch-Base checkpoint (google/switch-base-E's
shapes: scripts/hf_checkpoints.py; safetensors, as save_pretrained would)
without torch, then runs `from-hf` and `to-hf` each in a fresh process and
prints, side by side, the seconds and the peak resident memory of each,
over the checkpoint's size on disk. The round trip is checked bit for bit.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def _switch_base(experts: int) -> dict:
  return {"architectures": ["SwitchTransformersForConditionalGeneration"],
          "model_type": "switch_transformers", "vocab_size": 32128,
          "d_model": 768, "d_ff": 3072, "d_kv": 64, "num_heads": 12,
          "num_layers": 12, "num_decoder_layers": 12,
          "num_sparse_encoder_layers": 6, "num_sparse_decoder_layers": 6,
          "num_experts": experts, "expert_capacity": 64,
          "dense_act_fn": "relu", "tie_word_embeddings": True}


def write_checkpoint(path: str, experts: int, dtype: str) -> int:
  """A random checkpoint in `path`; returns its parameter count."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from switchjax import hf_files  # pylint: disable=g-import-not-at-top
  from switchjax import hf_layout  # pylint: disable=g-import-not-at-top
  from switchjax import model as model_lib  # pylint: disable=g-import-not-at-top
  from switchjax import weights  # pylint: disable=g-import-not-at-top
  hf = _switch_base(experts)
  config = hf_layout.config_from_hf(hf)
  abstract = nnx.eval_shape(
      lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  params = {p: rng.standard_normal(s, dtype=np.float32) * 0.02
            for p, s in weights.shapes(nnx.state(abstract, nnx.Param)).items()}
  tensors = {n: hf_files.as_dtype(a, dtype)
             for n, a in hf_layout.hf_tensors(params, config).items()}
  os.makedirs(path)
  hf_files.write_tensors(path, tensors)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**hf, "dtype": dtype}, f)
  return sum(a.size for a in params.values())


# Runs the converter and, at exit, prints its own peak RSS (KiB on Linux).
_WRAPPER = ("import atexit, resource, runpy, sys; atexit.register(lambda: "
            "print('maxrss', resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss, file=sys.stderr)); sys.argv = ['convert'] + "
            "sys.argv[1:]; runpy.run_module('switchjax.convert', "
            "run_name='__main__')")


def _timed(args: list[str]) -> tuple[float, float]:
  """(seconds, peak RSS in GiB) of `python -m switchjax.convert args`."""
  t = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", _WRAPPER, *args], check=True,
                       capture_output=True, text=True)
  seconds = time.perf_counter() - t
  kib = [int(l.split()[1]) for l in out.stderr.splitlines()
         if l.startswith("maxrss ")]
  return seconds, kib[-1] / 2**20


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--dtype", default="bfloat16",
                 choices=("float32", "bfloat16"))
  p.add_argument("--dir", default="/tmp/convert_bench")
  args = p.parse_args(argv)
  shutil.rmtree(args.dir, ignore_errors=True)
  src, wd, back = (os.path.join(args.dir, n) for n in ("hf", "wd", "back"))
  n = write_checkpoint(src, args.experts, args.dtype)
  size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
  rows = [("from-hf", *_timed(["from-hf", "--path", src, "--workdir", wd])),
          ("to-hf", *_timed(["to-hf", "--workdir", wd, "--path", back]))]
  from switchjax import hf_files  # pylint: disable=g-import-not-at-top
  a, b = hf_files.read_tensors(src), hf_files.read_tensors(back)
  same = sorted(a) == sorted(b) and all(
      a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
  print(f"switch-base-{args.experts} shapes: {n / 1e6:.0f}M params, "
        f"{size / 2**30:.2f} GiB of {args.dtype} safetensors; round trip "
        f"bit for bit: {same}")
  print("| step | seconds | peak RSS GiB | peak / checkpoint size |")
  print("|---|---|---|---|")
  for name, seconds, gib in rows:
    print(f"| {name} | {seconds:.1f} | {gib:.2f} | "
          f"{gib * 2**30 / size:.1f}x |")


if __name__ == "__main__":
  main()
