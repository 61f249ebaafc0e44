"""Checksums of a saved checkpoint step, recorded at save, checked at restore.

A step whose bytes changed after it was written but which still decodes
(a bad disk, a partial copy over it, a stray write) would otherwise
restore silently different numbers. `record` writes the SHA-256 and size of
every file in the step's directory to `switchjax_checksums.json` beside
them; `mismatch` says which file no longer matches, if any. Steps saved
before checksums existed have no record and are not checked.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

RECORD = "switchjax_checksums.json"
_CHUNK = 1 << 22  # 4 MiB reads: large arrays never sit in memory whole


class ChecksumMismatch(Exception):
  """A file of a checkpoint step differs from what was saved."""


def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != RECORD:
        out.append(rel)
  return sorted(out)


def record(step_dir: str) -> int:
  """Writes step_dir's checksum record; returns the bytes it hashed."""
  files = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _digest(os.path.join(step_dir, rel))}
           for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, RECORD + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": files}, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, RECORD))  # whole or not at all
  return sum(v["bytes"] for v in files.values())


def mismatch(step_dir: str) -> Optional[str]:
  """None if step_dir matches its record (or has none), else what differs."""
  path = os.path.join(step_dir, RECORD)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"its checksum record {RECORD} is unreadable ({e})"
  for rel, want in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    size = os.path.getsize(full)
    if size != want["bytes"]:
      return f"{rel} is {size} bytes, {want['bytes']} when saved"
    if _digest(full) != want["sha256"]:
      return f"{rel} was altered after it was saved (SHA-256 differs)"
  return None
