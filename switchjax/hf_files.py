"""Reading and writing a Hugging Face checkpoint directory, without torch.

A directory holds `config.json` and its tensors in `model.safetensors`, a
sharded `model.safetensors.index.json`, or `pytorch_model.bin` (which needs
torch; one line says so when it is missing). Tensors come back as numpy
arrays in their stored dtype (bfloat16 as ml_dtypes' bfloat16).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# numpy's bfloat16 (ml_dtypes', which JAX registers and safetensors reads).
_BF16 = np.dtype(jnp.bfloat16)
SENTENCEPIECE = "spiece.model"  # what T5's tokenizer calls its vocabulary
# transformers' default shard size in save_pretrained.
MAX_SHARD_BYTES = 5 * 2**30


class HfFileError(ValueError):
  """A directory that is not a readable Hugging Face checkpoint (one line)."""


def is_hf_dir(path: str) -> bool:
  """A directory with config.json and some weights file (no switchjax run)."""
  names = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
  return (os.path.isfile(os.path.join(path, "config.json"))
          and any(os.path.isfile(os.path.join(path, n)) for n in names))


def read_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  try:
    with open(file) as f:
      return json.load(f)
  except OSError as e:
    raise HfFileError(f"{file}: {e.strerror}") from None
  except ValueError as e:
    raise HfFileError(f"{file} is not JSON ({e})") from None


def _shards(path: str, index: str) -> list[str]:
  with open(os.path.join(path, index)) as f:
    weight_map = json.load(f)["weight_map"]
  return sorted(set(weight_map.values()))


def _read_torch(file: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise HfFileError(f"{file} is a torch pickle and torch is not installed: "
                      "pip install torch, or convert the directory to "
                      "safetensors first") from None
  state = torch.load(file, map_location="cpu", weights_only=True)
  out = {}
  for name, t in state.items():
    t = t.detach()
    # numpy has no bfloat16: go through float32, which holds it exactly.
    out[name] = (t.float().numpy().astype(_BF16) if t.dtype == torch.bfloat16
                 else t.numpy())
  return out




def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint in `path`, by name, as stored."""
  if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
    files, reader = _shards(path, SAFETENSORS_INDEX), safetensors_np.load_file
  elif os.path.isfile(os.path.join(path, SAFETENSORS)):
    files, reader = [SAFETENSORS], safetensors_np.load_file
  elif os.path.isfile(os.path.join(path, TORCH_BIN_INDEX)):
    files, reader = _shards(path, TORCH_BIN_INDEX), _read_torch
  elif os.path.isfile(os.path.join(path, TORCH_BIN)):
    files, reader = [TORCH_BIN], _read_torch
  else:
    raise HfFileError(f"{path} holds no {SAFETENSORS}, {SAFETENSORS_INDEX} "
                      f"or {TORCH_BIN}")
  out = {}
  for name in files:
    file = os.path.join(path, name)
    try:
      out.update(reader(file))
    except HfFileError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise HfFileError(f"{file} does not read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
  return out


def dtype_name(a: np.ndarray) -> str:
  return "bfloat16" if a.dtype == _BF16 else a.dtype.name


def as_dtype(a: np.ndarray, name: str) -> np.ndarray:
  """`a` in the dtype called `name` ('float32', 'bfloat16', 'float16')."""
  return a.astype(_BF16 if name == "bfloat16" else np.dtype(name))


def write_tensors(path: str, tensors: dict[str, np.ndarray],
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes `tensors` as model.safetensors, or shards and an index past
  `max_shard_bytes`, as save_pretrained does. Returns the files written."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    a = tensors[name]
    if shards[-1] and size + a.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = a
    size += a.nbytes
  metadata = {"format": "pt"}  # transformers refuses files without it
  if len(shards) == 1:
    safetensors_np.save_file(shards[0], os.path.join(path, SAFETENSORS),
                             metadata=metadata)
    return [SAFETENSORS]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
           for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    safetensors_np.save_file(shard, os.path.join(path, name), metadata=metadata)
    weight_map.update({t: name for t in shard})
  total = sum(a.nbytes for a in tensors.values())
  with open(os.path.join(path, SAFETENSORS_INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              f, indent=2, sort_keys=True)
  return names + [SAFETENSORS_INDEX]


def copy_vocabulary(src_dir: str, dest_dir: str,
                    vocab_file: Optional[str] = None) -> Optional[str]:
  """Copies spiece.model (or `vocab_file`) to dest_dir/spiece.model."""
  src = vocab_file or os.path.join(src_dir, SENTENCEPIECE)
  if not src or not os.path.isfile(src):
    return None
  dest = os.path.join(dest_dir, SENTENCEPIECE)
  shutil.copyfile(src, dest)
  return dest
