"""Checksums of a checkpoint step: recorded, then every kind of change found."""
import hashlib
import json
import os

from switchjax import checksums


def _step(tmp_path):
  d = tmp_path / "4"
  (d / "state" / "d").mkdir(parents=True)
  (d / "state" / "d" / "chunk").write_bytes(bytes(range(256)) * 40000)
  (d / "state" / "_METADATA").write_text("{}")
  (d / "data").mkdir()
  (d / "data" / "process_0.json").write_text('{"pos": 3}')
  return d


def test_record_holds_every_files_size_and_sha256(tmp_path):
  d = _step(tmp_path)
  assert checksums.record(str(d)) == 256 * 40000 + 2 + 10
  files = json.loads((d / checksums.RECORD).read_text())["files"]
  assert sorted(files) == ["data/process_0.json", "state/_METADATA",
                           "state/d/chunk"]
  chunk = (d / "state" / "d" / "chunk").read_bytes()
  assert files["state/d/chunk"] == {
      "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()}
  assert checksums.mismatch(str(d)) is None
  assert not list(d.glob("*.tmp"))


def test_every_change_is_named(tmp_path):
  d = _step(tmp_path)
  checksums.record(str(d))
  chunk = d / "state" / "d" / "chunk"
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 1
  chunk.write_bytes(bytes(data))
  assert checksums.mismatch(str(d)) == (
      "state/d/chunk was altered after it was saved (SHA-256 differs)")
  chunk.write_bytes(bytes(data[:-1]))
  assert checksums.mismatch(str(d)) == (
      f"state/d/chunk is {len(data) - 1} bytes, {len(data)} when saved")
  os.remove(chunk)
  assert checksums.mismatch(str(d)) == "state/d/chunk is missing"
  (d / checksums.RECORD).write_text("{not json")
  assert checksums.mismatch(str(d)).startswith(
      f"its checksum record {checksums.RECORD} is unreadable")


def test_a_step_saved_without_a_record_is_not_checked(tmp_path):
  d = _step(tmp_path)
  (d / "data" / "process_0.json").write_text("changed")
  assert checksums.mismatch(str(d)) is None
