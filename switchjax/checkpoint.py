"""Orbax checkpoints of the train state and the data iterator position.

A checkpoint step holds two items: `state` (params, optimizer state, step;
sharded arrays, written collectively by every process) and `data` (each
process's grain iterator state, one file per process). Orbax writes a step
into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous step as the newest complete one.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs by step."""

  def __init__(self, workdir: str, *, max_to_keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # Synchronous: a step counts as saved only once it is on disk.
            enable_async_checkpointing=False),
        item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """The train state of `step`; `data_iterator` is moved to its position.

    abstract_state: pytree of jax.ShapeDtypeStruct with the target shardings,
      so a checkpoint written on one mesh lands on another.
    """
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def close(self) -> None:
    self._manager.close()
