"""Orbax checkpoints of the train state and the data iterator position.

A checkpoint step holds two items: `state` (params, optimizer state, step;
sharded arrays, written collectively by every process) and `data` (each
process's grain iterator state, one file per process). Orbax writes a step
into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous step as the newest complete one.

What can still go wrong, and what happens:

- a save killed midway leaves `<step>.orbax-checkpoint-tmp*`: moved aside at
  start;
- files of a finished step truncated, lost or altered (a bad disk, a partial
  copy; altered bytes that still decode are caught by the SHA-256 of every
  file recorded at save, checksums.py):
  `restore_latest` tries the steps newest first and moves a step aside only
  once an older one restored, so a fault that hits every step (a bug, a
  missing device) is raised, not blamed on the checkpoints;
- checkpoints of another model (shapes or structure differ): `check_compatible`
  refuses them before the run writes anything.

"Moved aside" is to `<workdir>/checkpoints_corrupt/<name>-<UTC time>`, with a
one-line report; nothing is deleted.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
from typing import Any, Callable, Optional

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from switchjax import checksums
from switchjax import faults
from switchjax import validate

TMP_MARK = ".orbax-checkpoint-tmp"
CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointError(faults.RunError):
  """No checkpoint could be restored, or one could not be saved."""


class WeightsOnly(CheckpointError):
  """A step written without a data position (converted weights): never moved aside."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def steps_on_disk(workdir: str) -> list[int]:
  """The step directories under workdir/checkpoints/, oldest first (what
  is on disk, readable or not; no orbax manager is opened)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """'params/encoder/.../value' -> (shape, dtype) for every array leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def fmt_shape(shape_dtype) -> str:
  """(shape, dtype name) -> 'float32[32, 64]'."""
  shape, dtype = shape_dtype
  return f"{dtype}[{', '.join(map(str, shape))}]"


def _differences(saved: dict, wanted: dict) -> list[str]:
  out = []
  for path in sorted(set(saved) | set(wanted),
                     key=lambda p: (not p.startswith("params"), p)):
    if path not in saved:
      out.append(f"{path} is missing there")
    elif path not in wanted:
      out.append(f"{path} is {fmt_shape(saved[path])} there and absent here")
    elif saved[path] != wanted[path]:
      out.append(f"{path} is {fmt_shape(saved[path])} there, "
                 f"{fmt_shape(wanted[path])} here")
  return out


def state_metadata(workdir: str, step: int) -> Any:
  """The saved state's tree of array metadata (shape, dtype) of a step in
  workdir; reads no arrays."""
  handler = ocp.StandardCheckpointHandler()
  try:
    meta = handler.metadata(
        epath.Path(checkpoint_dir(workdir)) / str(step) / "state")
  finally:
    handler.close()
  return getattr(meta, "item_metadata", meta)


def _restore_failure(error: BaseException) -> str:
  """One line on why a restore failed (TensorStore errors run to pages)."""
  text = str(error).strip()
  line = text.splitlines()[0] if text else type(error).__name__
  line = line.split(" See full TensorStore details")[0]
  arrays = re.findall(r"'path': '([^']+/)'", text)
  if arrays:
    line += f" (array {arrays[-1].rstrip('/')})"
  return f"{type(error).__name__}: {line}"[:240]


def check_compatible(workdir: str, abstract_state: Any) -> None:
  """Refuses (ConfigError) checkpoints in workdir that hold another model.

  Reads only metadata, writes nothing. Decided by the newest step whose
  metadata reads; unreadable steps are left to `restore_latest`.
  """
  wanted = _shapes(abstract_state)
  for step in reversed(steps_on_disk(workdir)):
    try:
      saved = _shapes(state_metadata(workdir, step))
    except Exception:  # pylint: disable=broad-except
      continue  # unreadable: corrupt, not another model
    diffs = _differences(saved, wanted)
    if diffs:
      more = f"; {len(diffs) - 1} more differences" if len(diffs) > 1 else ""
      raise validate.ConfigError(
          f"--workdir {workdir} holds checkpoints of another model (step "
          f"{step}: {diffs[0]}{more}); use a new workdir")
    return


def _save_failure(error: BaseException) -> str:
  """'No space left on device: PATH' out of TensorStore's write errors."""
  if isinstance(error, OSError) and error.strerror:
    return f"{error.strerror}: {error.filename}"
  text = str(error)
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:
    path = re.search(r'Failed writing: "([^"]+)"', text)
    return os.strerror(int(code.group(1))) + (f": {path.group(1)}"
                                              if path else "")
  return faults.one_line(error)


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs by step.

  log: where one-line reports go (moved-aside checkpoints); None on processes
    other than 0, which also leave the moving to process 0.
  """

  def __init__(self, workdir: str, *, max_to_keep: int,
               log: Optional[Callable[[str], None]] = print):
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    self._log = log
    self._is_main = jax.process_index() == 0
    if self._is_main and os.path.isdir(self.directory):
      for name in sorted(os.listdir(self.directory)):
        if TMP_MARK in name:
          dest = self._move_aside(name)
          self._report(f"checkpoint {name} is half-written (a save was "
                       f"interrupted); moved to {dest}")
    self._sync("tmp")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # Synchronous: a step counts as saved only once it is on disk.
            enable_async_checkpointing=False),
        item_names=("state", "data"))

  def _report(self, line: str) -> None:
    if self._log is not None:
      self._log(line)

  @staticmethod
  def _sync(name: str) -> None:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"switchjax_checkpoint_{name}")

  def _move_aside(self, name: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%S.%fZ")
    dest = os.path.join(self.workdir, CORRUPT_DIR, f"{name}-{stamp}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(os.path.join(self.directory, name), dest)
    return dest

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def last_good_text(self) -> str:
    """'last good checkpoint: step N in DIR' for error messages."""
    return faults.last_checkpoint_text(self.latest_step(), self.directory)

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Saves `state` and, unless None, the data iterator's position.

    A step saved without the iterator (converted weights) restores with
    `data_iterator=None` only; training resumes need it.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
      self._manager.wait_until_finished()
      if self._is_main:  # the step is final: every process's files are in
        checksums.record(os.path.join(self.directory, str(step)))
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore report a full disk in several types.
      raise CheckpointError(
          f"saving checkpoint step {step} failed ({_save_failure(e)}); "
          f"{self.last_good_text()}; the partial save is moved aside on the "
          "next start: fix the cause and run the same command again to "
          "resume") from e

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """The train state of `step`; `data_iterator` is moved to its position.

    abstract_state: pytree of jax.ShapeDtypeStruct with the target shardings,
      so a checkpoint written on one mesh lands on another.
    data_iterator: None restores the state alone (tools that only read
      the weights, and weights-only steps).
    Raises checksums.ChecksumMismatch if a file changed since the save.
    """
    why = checksums.mismatch(os.path.join(self.directory, str(step)))
    if why:
      raise checksums.ChecksumMismatch(why)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
        raise WeightsOnly(
            f"checkpoint step {step} in {self.directory} holds weights only "
            "(no data position): start a run from it with "
            "--config.train.init_from, it cannot be resumed")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_latest(self, abstract_state: Any,
                     data_iterator: Any) -> tuple[Optional[int], Any]:
    """(step, state) of the newest step that restores, or (None, None).

    Steps newer than it that failed are moved aside (one line each). If no
    step restores, nothing is moved and CheckpointError says why.
    """
    failed = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except WeightsOnly:
        raise
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, _restore_failure(e)))
        continue
      if failed:
        if self._is_main:
          for bad, why in failed:
            dest = self._move_aside(str(bad))
            self._report(f"checkpoint step {bad} is unreadable ({why}); "
                         f"moved to {dest}; resuming from step {step}")
        self._sync("corrupt")
        self._manager.reload()
      return step, state
    if failed:
      steps = ", ".join(str(s) for s, _ in failed)
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores (steps {steps}; newest: "
          f"{failed[0][1]}); nothing was moved; move them out of checkpoints/ "
          "to start over, or use a new workdir")
    return None, None

  def close(self) -> None:
    self._manager.close()
