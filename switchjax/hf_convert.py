"""Hugging Face checkpoints in and out of switchjax workdirs (the library).

`python -m switchjax.convert` is its command line (see there and README,
"Hugging Face checkpoints"). `from_hf` reads a directory
(`hf_checkpoint.read_hf`) into a weights-only workdir at step 0
(`write_workdir`: every tool loads it; `train.init_from` starts runs from
it), `to_hf` the reverse.
WD/hf_source.json keeps the source's config.json and tensor dtypes, so that
from-hf then to-hf gives the same tensors back bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_np

from switchjax import checkpoint as ckpt_lib
from switchjax import hf_checkpoint
from switchjax import hf_files
from switchjax import hf_layout
from switchjax import train as train_lib
from switchjax import validate
from switchjax import weights

SOURCE_FILE = "hf_source.json"
UNUSED_FILE = "hf_unused.safetensors"


class ConvertError(ValueError):
  """Bad input to a conversion (one line)."""


def _resolve_source(path: str) -> str:
  """A local directory, or a hub id downloaded with huggingface_hub."""
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
    raise ConvertError(f"--path {path} is not a directory")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConvertError(
        f"--path {path} is not a local directory; to fetch the hub id "
        "install huggingface_hub, or download it elsewhere and pass the "
        "directory") from None
  try:
    return huggingface_hub.snapshot_download(
        path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.bin"])
  except Exception as e:  # pylint: disable=broad-except
    raise ConvertError(f"--path {path}: download failed ({type(e).__name__}); "
                       "download it elsewhere and pass the directory") from None


@contextlib.contextmanager
def _fresh_dir(path: str, flag: str) -> Iterator[str]:
  """A temporary sibling of `path`, renamed to it when the block succeeds."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ConvertError(f"{flag} {path} already exists; converting never "
                       "overwrites, choose a new directory")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.converting-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.isdir(path):
      os.rmdir(path)  # empty, checked above
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_workdir(workdir: str, config, params: dict,
                  source: Optional[dict] = None,
                  vocab_file: Optional[str] = None) -> None:
  """A workdir holding config.json and `params` as a weights-only step 0."""
  with _fresh_dir(workdir, "--workdir") as tmp:
    if vocab_file and hf_files.copy_vocabulary("", tmp, vocab_file):
      config.data.vocab_path = os.path.join(os.path.abspath(workdir),
                                            hf_files.SENTENCEPIECE)
    trainer = train_lib.make_trainer(config)
    state_params = weights.place(trainer.abstract_state["params"], params)
    opt_init = jax.jit(trainer.tx.init,
                       out_shardings=trainer.state_shardings["opt_state"])
    state = {"step": jnp.zeros((), jnp.int32), "params": state_params,
             "opt_state": opt_init(state_params),
             "skipped_steps": jnp.zeros((), jnp.int32)}
    validate.write_config(config, tmp)
    if source is not None:
      record = {k: v for k, v in source.items() if k != "unused"}
      record["unused"] = sorted(source.get("unused", {}))
      with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
      if source.get("unused"):
        safetensors_np.save_file(source["unused"],
                                 os.path.join(tmp, UNUSED_FILE))
    checkpointer = ckpt_lib.Checkpointer(tmp, max_to_keep=1, log=None)
    try:
      checkpointer.save(0, state, None)
    finally:
      checkpointer.close()


def load_workdir(workdir: str, step: Optional[int] = None):
  """(config, step, {param path: np.ndarray}, trainer) of a workdir."""
  config = weights.read_config(workdir)
  trainer = train_lib.make_trainer(config)
  step, state = weights.restore(workdir, trainer.abstract_state, step)
  flat = {p: np.asarray(a) for p, a in weights.flat_params(state["params"]).items()}
  return config, step, flat, trainer


def from_hf(path: str, workdir: str) -> str:
  path = _resolve_source(path)
  config, params, source = hf_checkpoint.read_hf(path)
  vocab = os.path.join(path, hf_files.SENTENCEPIECE)
  write_workdir(workdir, config, params, source,
                vocab_file=vocab if os.path.isfile(vocab) else None)
  return (f"converted {source['architecture']} ({len(source['dtypes'])} "
          f"tensors) into {workdir}")


def to_hf(workdir: str, path: str, step: Optional[int] = None,
          expert_capacity: int = 0) -> str:
  source = {}
  source_file = os.path.join(workdir, SOURCE_FILE)
  if os.path.isfile(source_file):
    with open(source_file) as f:
      source = json.load(f)
  # What HF cannot express is refused before any weights are read.
  hf = hf_layout.hf_config(weights.read_config(workdir), source.get("config"),
                           expert_capacity)
  config, step, params, _ = load_workdir(workdir, step)
  tensors = hf_layout.named_as(hf_layout.hf_tensors(params, config),
                          source.get("dtypes", {}))
  unused = os.path.join(workdir, UNUSED_FILE)
  if os.path.isfile(unused) and set(tensors) == set(source["dtypes"]):
    tensors.update(safetensors_np.load_file(unused))
  if "lm_head.weight" not in tensors and not config.model.tie_embeddings:
    # transformers 5's T5 ties the head without scaling: keep its flags.
    hf["tie_word_embeddings"] = source.get("config", {}).get(
        "tie_word_embeddings", True)
  # Each tensor in the dtype the source stored it in; new ones (another
  # structure, e.g. upcycled) in the source's usual dtype, or float32.
  dtypes = source.get("dtypes", {})
  usual = (max(set(dtypes.values()), key=list(dtypes.values()).count)
           if dtypes else "float32")
  tensors = {n: hf_files.as_dtype(a, dtypes.get(n, usual))
             for n, a in tensors.items()}
  hf["dtype"] = usual
  with _fresh_dir(path, "--path") as tmp:
    hf_files.write_tensors(tmp, tensors)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf, f, indent=2, sort_keys=True)
    vocab = config.data.vocab_path
    if vocab and os.path.isfile(vocab):
      hf_files.copy_vocabulary("", tmp, vocab)
  return f"wrote step {step} of {workdir} as {hf['architectures'][0]} to {path}"


# Every one-line refusal of a conversion.
ERRORS = (ConvertError, hf_files.HfFileError, hf_layout.LayoutError,
          weights.WeightsError, ckpt_lib.CheckpointError)
