"""Orbax checkpoints of the train state under `output_dir/checkpoints/<step>`.

The state is written un-replicated (one copy, not one per device) with async saves.
"""

from __future__ import annotations

import pathlib
import shutil

import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(output_dir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(output_dir).resolve() / CHECKPOINT_SUBDIR


def saved_steps(output_dir: str | pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints in output_dir (empty when there are none)."""
  directory = checkpoint_dir(output_dir)
  if not directory.is_dir():
    return []
  return sorted(int(path.name) for path in directory.iterdir()
                if path.is_dir() and path.name.isdigit())


def create_manager(output_dir: str | pathlib.Path,
                   remove_existing: bool = False) -> ocp.CheckpointManager:
  """A manager for output_dir's checkpoints; `remove_existing` first deletes an earlier run's
  (a fresh run in an overwritten output_dir must not mix its steps with the old ones)."""
  if remove_existing:
    for step in saved_steps(output_dir):
      shutil.rmtree(checkpoint_dir(output_dir) / str(step))
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Starts an async save of the (un-replicated) state; `manager.wait_until_finished()` ends it."""
  manager.save(step, args=ocp.args.StandardSave(state))


def restore(output_dir: str | pathlib.Path, step: int, abstract_state):
  with ocp.CheckpointManager(checkpoint_dir(output_dir)) as manager:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
