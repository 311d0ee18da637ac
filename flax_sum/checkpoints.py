"""Orbax checkpoints of the train state under `output_dir/checkpoints/<step>`.

Each step directory holds: `state`, the train state written un-replicated (one copy, not one
per device) with async saves; `model_config`, the model's Hugging Face config.json dict, so that
a checkpoint alone can be exported (`python -m flax_sum.export`); and `progress`, what an exact
resume needs besides the state (the batch layout it was trained with and the summed loss so far;
the data position and the dropout keys follow from the step), plus the eval metrics of the
step when it was evaluated, from which the best checkpoint is found again after a resume.

`save_total_limit` retention is ours rather than Orbax's `max_to_keep`: it runs only when no save
is in flight (so the checkpoint a run resumed from outlives the first newer complete one), keeps
the best checkpoint as Hugging Face does, and leaves `stale-<step>` directories alone.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import sys
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from flax_sum import distributed
from flax_sum.errors import UserError, disk_error, os_error_of
from flax_sum.model import T5Config

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM = "state"
MODEL_CONFIG_ITEM = "model_config"
PROGRESS_ITEM = "progress"
# A checkpoint being deleted is renamed first, so a deletion cut short never leaves a partial
# directory that looks like a step.
DELETING_PREFIX = "deleting-"
# Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it once complete.
PARTIAL_SUFFIX = ".orbax-checkpoint-tmp"


def checkpoint_dir(output_dir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(output_dir).resolve() / CHECKPOINT_SUBDIR


def saved_steps(output_dir: str | pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints in output_dir (empty when there are none)."""
  directory = checkpoint_dir(output_dir)
  if not directory.is_dir():
    return []
  return sorted(int(path.name) for path in directory.iterdir()
                if path.is_dir() and path.name.isdigit())


def create_manager(output_dir: str | pathlib.Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options)


def remove_all(output_dir: str | pathlib.Path) -> None:
  """Deletes an earlier run's checkpoints, for a fresh run in an overwritten output_dir."""
  for step in saved_steps(output_dir):
    shutil.rmtree(checkpoint_dir(output_dir) / str(step))


def set_aside_after(output_dir: str | pathlib.Path, step: int) -> list[pathlib.Path]:
  """Renames the checkpoints after `step` to `stale-<step>` (never deletes them), so a run
  resumed from `step` writes its own; returns their new paths."""
  moved = []
  for later in (s for s in saved_steps(output_dir) if s > step):
    target = checkpoint_dir(output_dir) / f"stale-{later}"
    suffix = 1
    while target.exists():
      suffix += 1
      target = checkpoint_dir(output_dir) / f"stale-{later}-{suffix}"
    (checkpoint_dir(output_dir) / str(later)).rename(target)
    moved.append(target)
  return moved


def steps_to_keep(steps: Sequence[int], limit: int | None,
                  best_step: int | None = None) -> list[int]:
  """The steps Hugging Face's `save_total_limit` keeps: the newest `limit`; when the best step is
  older, the best and the newest `limit - 1` others (at least one, the step to resume from).
  A limit of None or below 1 keeps every step."""
  ordered = sorted(steps)
  if limit is None or limit < 1:
    return ordered
  newest = ordered[-limit:]
  if best_step is None or best_step not in ordered or best_step in newest:
    return newest
  others = [step for step in ordered if step != best_step]
  return sorted([best_step, *others[-max(limit - 1, 1):]])


def delete_checkpoint(step_dir: pathlib.Path) -> None:
  doomed = step_dir.with_name(DELETING_PREFIX + step_dir.name)
  step_dir.rename(doomed)
  shutil.rmtree(doomed)


def apply_save_total_limit(output_dir: str | pathlib.Path, limit: int | None,
                           best_step: int | None = None) -> list[pathlib.Path]:
  """Deletes the complete checkpoints that `steps_to_keep` does not keep and returns their paths.
  Call it only while no save is in flight: a save under way is not counted yet."""
  directory = checkpoint_dir(output_dir)
  for leftover in directory.glob(DELETING_PREFIX + "*"):
    shutil.rmtree(leftover)
  steps = saved_steps(output_dir)
  kept = set(steps_to_keep(steps, limit, best_step))
  deleted = []
  for step in steps:
    if step not in kept:
      delete_checkpoint(directory / str(step))
      deleted.append(directory / str(step))
  return deleted


def save(manager: ocp.CheckpointManager, step: int, state: Any, model_config: T5Config,
         progress: dict[str, Any] | None = None) -> None:
  """Starts an async save of the (un-replicated) state, the model's Hugging Face config and the
  training progress; `manager.wait_until_finished()` ends it."""
  items = {STATE_ITEM: ocp.args.StandardSave(state),
           MODEL_CONFIG_ITEM: ocp.args.JsonSave(model_config.to_hf_dict())}
  if progress is not None:
    items[PROGRESS_ITEM] = ocp.args.JsonSave(progress)
  manager.save(step, args=ocp.args.Composite(**items))


def quiet_closed_event_loop_reports() -> None:
  """Drops what tensorstore writes still in flight print after an async save failed: each reports
  to Orbax's closed event loop ("RuntimeError: Event loop is closed", a traceback apiece) through
  sys.unraisablehook, which the save's own error already covers. Other reports pass."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_event_loop", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_event_loop = True
  sys.unraisablehook = hook


def remove_partial_save(output_dir: str | pathlib.Path, step: int) -> None:
  """Deletes what a failed save of `step` left in Orbax's temporary directory (never a step
  directory), to give the space back."""
  for partial in checkpoint_dir(output_dir).glob(f"{step}{PARTIAL_SUFFIX}*"):
    shutil.rmtree(partial, ignore_errors=True)


def checkpoint_save_error(error: BaseException, step: int, output_dir: pathlib.Path,
                          config) -> UserError | None:
  """The one-line error for a checkpoint save the disk refused (None for any other failure).
  Orbax renames a step directory only once it is complete, so the earlier checkpoints are whole;
  the failed save's temporary directory is removed to give its space back."""
  os_error = os_error_of(error)
  if os_error is None:
    return None
  if distributed.is_main_process():
    remove_partial_save(output_dir, step)
  directory = checkpoint_dir(output_dir)
  earlier = [saved for saved in saved_steps(output_dir) if saved < step]
  if earlier and config.resume_from_checkpoint:
    then = f"resume with --resume_from_checkpoint {directory / str(earlier[-1])}"
  elif earlier:
    then = f"run the same command again to resume from step {earlier[-1]}"
  elif config.resume_from_checkpoint:
    then = "run the same command again to resume from --resume_from_checkpoint"
  else:
    then = ("run the same command again with --overwrite_output_dir (no checkpoint was complete "
            "yet)")
  return disk_error(os_error, f"saving checkpoint {step}", directory, then,
                    fewer_checkpoints=config.save_total_limit != 1)


@contextlib.contextmanager
def explaining_save_errors(step: int, output_dir: pathlib.Path, config) -> Iterator[None]:
  """Around starting or waiting for the save of `step`: a failure the disk caused becomes
  checkpoint_save_error's one line; any other failure passes unchanged."""
  try:
    yield
  except Exception as error:
    failure = checkpoint_save_error(error, step, output_dir, config)
    if failure is None:
      raise
    raise failure from error


def restore_training(step_dir: pathlib.Path, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
  """(train state laid out like `abstract_state`, progress) of a step directory."""
  if not (step_dir / PROGRESS_ITEM).is_dir():
    raise UserError(f"checkpoint {step_dir} has no training progress (it is incomplete or was "
                    "written by an older flax-sum): resume from another checkpoint or pass "
                    "--overwrite_output_dir to start fresh")
  handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(),
              PROGRESS_ITEM: ocp.JsonCheckpointHandler()}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)) as checkpointer:
    restored = checkpointer.restore(step_dir, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        PROGRESS_ITEM: ocp.args.JsonRestore()}))
  return restored[STATE_ITEM], restored[PROGRESS_ITEM]


def read_progress(step_dir: pathlib.Path) -> dict[str, Any]:
  """The progress JSON of a step directory, without its state."""
  # Every item gets a handler, restored or not; Orbax warns about items without one.
  handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(),
              MODEL_CONFIG_ITEM: ocp.JsonCheckpointHandler(),
              PROGRESS_ITEM: ocp.JsonCheckpointHandler()}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)) as checkpointer:
    restored = checkpointer.restore(step_dir, args=ocp.args.Composite(
        **{PROGRESS_ITEM: ocp.args.JsonRestore()}))
  return restored[PROGRESS_ITEM]


def recorded_eval_metrics(directory: pathlib.Path,
                          up_to_step: int) -> list[tuple[pathlib.Path, dict[str, Any]]]:
  """(step directory, eval metrics) of the checkpoints in `directory` (a `checkpoints/`
  directory) up to `up_to_step` that were evaluated, oldest first; unreadable ones are left
  out."""
  recorded = []
  for step_dir in sorted((path for path in directory.iterdir() if _is_step_dir(path)),
                         key=lambda path: int(path.name)):
    if int(step_dir.name) > up_to_step or not (step_dir / PROGRESS_ITEM).is_dir():
      continue
    try:
      eval_metrics = read_progress(step_dir).get("eval_metrics")
    except Exception:  # A partial or corrupt checkpoint: it cannot be the best one either.
      continue
    if eval_metrics:
      recorded.append((step_dir, eval_metrics))
  return recorded


def _is_step_dir(path: pathlib.Path) -> bool:
  return path.name.isdigit() and path.parent.name == CHECKPOINT_SUBDIR and path.is_dir()


def find_step_dir(path: str | pathlib.Path) -> pathlib.Path:
  """A checkpoint step directory given itself, an output_dir or its checkpoints/ directory;
  the latter two mean their latest step."""
  path = pathlib.Path(path).expanduser().resolve()
  if not path.exists():
    raise UserError(f"no checkpoint at {path}: pass a step directory "
                    f"(OUTPUT_DIR/{CHECKPOINT_SUBDIR}/STEP) or a training output_dir")
  if not path.is_dir():
    raise UserError(f"{path} is a file: pass a checkpoint step directory "
                    f"(OUTPUT_DIR/{CHECKPOINT_SUBDIR}/STEP) or a training output_dir")
  if _is_step_dir(path):
    return path
  output_dir = path.parent if path.name == CHECKPOINT_SUBDIR else path
  steps = saved_steps(output_dir)
  if not steps:
    raise UserError(f"no checkpoint in {path}: expected a step directory "
                    f"(OUTPUT_DIR/{CHECKPOINT_SUBDIR}/STEP, as written by training with "
                    "flax-sum) or an output_dir holding some")
  return checkpoint_dir(output_dir) / str(steps[-1])


def load_params(checkpoint_path: str | pathlib.Path) -> tuple[T5Config, Any]:
  """(model config, float32 numpy params) of a step directory, without the optimizer state."""
  step_dir = find_step_dir(checkpoint_path)
  if not (step_dir / STATE_ITEM).is_dir() or not (step_dir / MODEL_CONFIG_ITEM).is_dir():
    raise UserError(f"checkpoint {step_dir} has no {STATE_ITEM} and {MODEL_CONFIG_ITEM} (it is "
                    "incomplete or was written by an older flax-sum): export another step or "
                    "use the final model in its output_dir")
  handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler(),
              MODEL_CONFIG_ITEM: ocp.JsonCheckpointHandler(),
              PROGRESS_ITEM: ocp.JsonCheckpointHandler()}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)) as checkpointer:
    state_metadata = checkpointer.metadata(step_dir).item_metadata[STATE_ITEM].tree
    # A run with bfloat16 params keeps their float32 master weights beside them.
    weights_key = "master_params" if state_metadata.get("master_params") else "params"
    if weights_key not in state_metadata:
      raise UserError(f"checkpoint {step_dir} holds no params")
    params_metadata = state_metadata[weights_key]
    # Restored as host numpy arrays: no device layout needed, whatever the saving machine had.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                params_metadata)
    restored = checkpointer.restore(step_dir, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(item={weights_key: params_metadata},
                                           restore_args={weights_key: restore_args},
                                           partial_restore=True),
        MODEL_CONFIG_ITEM: ocp.args.JsonRestore(),
    }))
  config = T5Config.from_hf_dict(restored[MODEL_CONFIG_ITEM])
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), restored[STATE_ITEM][weights_key])
  return config, params
