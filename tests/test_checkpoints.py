"""Checkpoint retention and the choice of the best checkpoint, as pure functions."""

import pathlib

import pytest

from flax_sum import checkpoints
from flax_sum import train
from flax_sum.errors import UserError


@pytest.mark.parametrize("limit, best_step, kept", [
    (None, None, [2, 4, 6, 8]),
    (0, None, [2, 4, 6, 8]),
    (2, None, [6, 8]),
    (5, None, [2, 4, 6, 8]),
    (2, 8, [6, 8]),  # The best is among the newest: nothing extra.
    (3, 2, [2, 6, 8]),  # The best and the newest limit - 1.
    (2, 4, [4, 8]),
    (1, 4, [4, 8]),  # Like Hugging Face, limit 1 keeps the best and the newest, to resume from.
    (1, 8, [8]),
])
def test_save_total_limit_keeps_the_newest_and_the_best(limit, best_step, kept):
  assert checkpoints.steps_to_keep([8, 2, 6, 4], limit, best_step) == kept


def test_apply_save_total_limit_deletes_only_old_step_directories(tmp_path):
  directory = checkpoints.checkpoint_dir(tmp_path)
  for name in ("1", "2", "3", "stale-2", "4.orbax-checkpoint-tmp", "deleting-7"):
    (directory / name).mkdir(parents=True)
  deleted = checkpoints.apply_save_total_limit(tmp_path, 1)
  assert deleted == [directory / "1", directory / "2"]
  # A save under way and a set-aside checkpoint stay; a deletion cut short is finished.
  assert sorted(p.name for p in directory.iterdir()) == ["3", "4.orbax-checkpoint-tmp",
                                                         "stale-2"]


@pytest.mark.parametrize("name, greater_is_better, expected", [
    (None, None, ("eval_loss", False)),
    ("loss", None, ("eval_loss", False)),
    ("eval_loss", True, ("eval_loss", True)),
    ("rouge1", None, ("eval_rouge1", True)),
    ("eval_rougeL", None, ("eval_rougeL", True)),
    ("accuracy", False, ("eval_accuracy", False)),
])
def test_metric_for_best_model_is_read_the_hugging_face_way(name, greater_is_better, expected):
  assert train.best_model_metric(name, greater_is_better, predict_with_generate=True) == expected


def test_an_unknown_metric_for_best_model_lists_the_available_ones():
  with pytest.raises(UserError, match="choose one of loss, accuracy, rouge1, rouge2, rougeL, "
                                      "rougeLsum, gen_len"):
    train.best_model_metric("rougel", None, predict_with_generate=True)


def test_the_best_checkpoint_needs_a_strictly_better_metric():
  first, second, third = (pathlib.Path(f"checkpoints/{step}") for step in (1, 2, 3))
  best = train.better_checkpoint(None, first, {"eval_loss": 2.0}, "eval_loss", False)
  best = train.better_checkpoint(best, second, {"eval_loss": 2.0}, "eval_loss", False)
  assert best == train.BestCheckpoint(first, 2.0)  # A tie keeps the earlier checkpoint.
  best = train.better_checkpoint(best, third, {"eval_loss": 1.5}, "eval_loss", False)
  assert best == train.BestCheckpoint(third, 1.5)
  assert train.better_checkpoint(best, first, {"eval_loss": 1.0}, "eval_loss", True) == best
  assert train.better_checkpoint(best, first, {"eval_loss": float("nan")}, "eval_loss",
                                 False) == best
