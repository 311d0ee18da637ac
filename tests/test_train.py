"""End to end through the real command line: train, eval-only, predict-only, result files."""

import csv
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import helpers
from flax_sum import checkpoints
from flax_sum import hf_checkpoint
from flax_sum import steps
from flax_sum import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY_T5 = helpers.TINY_T5_CONFIG

TOPICS = ["the weather", "a train ticket", "dinner plans", "a job interview", "the new phone",
          "a birthday party", "the football match"]


def write_csv(path, num_rows):
  """Rows with an unrelated first column, so the columns must be named explicitly."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["row_id", "conversation", "gist"])
    for i in range(num_rows):
      topic = TOPICS[i % len(TOPICS)]
      writer.writerow([i, f"#Person1#: Shall we talk about {topic}?\n#Person2#: Yes, {topic} "
                          f"matters to me, number {i}.", f"They talk about {topic}."])
  return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A trained tiny model (train + eval + predict in one run) shared by the tests below."""
  root = tmp_path_factory.mktemp("tiny")
  (root / "config.json").write_text(json.dumps(TINY_T5))
  data = {"train": write_csv(root / "train.csv", 40), "validation": write_csv(root / "dev.csv", 7),
          "test": write_csv(root / "test.csv", 5)}
  output_dir = root / "out"
  data_flags = ["--text_column", "conversation", "--summary_column", "gist",
                "--source_prefix", "summarize: ", "--max_source_length", "32",
                "--max_target_length", "8", "--per_device_eval_batch_size", "1"]
  train_flags = ["--config_name", str(root / "config.json"), "--train_file", data["train"],
                 *data_flags, "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
                 "--max_steps", "6", "--logging_steps", "2", "--save_steps", "3"]
  status = train.main([
      *train_flags, "--validation_file", data["validation"], "--test_file", data["test"],
      "--do_train", "--do_eval", "--do_predict", "--predict_with_generate", "--eval_steps", "4",
      "--output_dir", str(output_dir)])
  assert status == 0
  return {"root": root, "data": data, "output_dir": output_dir, "data_flags": data_flags,
          "train_flags": train_flags}


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def test_a_csv_with_custom_columns_trains_and_writes_every_output(tiny_run):
  output_dir = tiny_run["output_dir"]
  for name in ("train_results.json", "eval_results.json", "predict_results.json",
               "all_results.json", "generated_predictions.txt", "train_log.jsonl",
               "run_config.json", "config.json", "model.safetensors", "tokenizer_config.json"):
    assert (output_dir / name).is_file(), name
  assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["3", "6"]

  log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
  train_records = [r for r in log if "loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6]
  assert all(r["tokens_per_second"] > 0 and r["grad_norm"] > 0 for r in train_records)
  assert train_records[-1]["loss"] < train_records[0]["loss"]
  eval_records = [r for r in log if "eval_loss" in r]
  assert [r["step"] for r in eval_records] == [4]  # The final evaluation is in eval_results.

  all_results = read_json(output_dir / "all_results.json")
  for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second",
              "train_loss", "eval_loss", "eval_rouge1", "eval_rouge2", "eval_rougeL",
              "eval_rougeLsum", "eval_gen_len", "predict_rouge1", "predict_gen_len"):
    assert isinstance(all_results[key], float), key
  assert all_results["eval_samples"] == 7
  assert all_results["predict_samples"] == 5
  assert all_results["train_samples"] == 40
  # 6 steps of a global batch of 2 x 8 devices.
  assert all_results["train_samples_per_second"] == pytest.approx(
      6 * 16 / all_results["train_runtime"], rel=1e-2)

  # One line per predict example, in order, even though 5 rows do not fill 8 devices.
  predictions = (output_dir / "generated_predictions.txt").read_text().split("\n")
  assert predictions[-1] == "" and len(predictions) == 6

  # TensorBoard has every train-log record, and the final evaluation at the last step.
  scalars = helpers.tensorboard_scalars(output_dir / "runs")
  assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6]
  assert [value for _, value in scalars["train/loss"]] == pytest.approx(
      [r["loss"] for r in train_records], rel=1e-6)
  assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(scalars)
  assert [step for step, _ in scalars["eval/rouge1"]] == [4, 6]
  assert scalars["eval/loss"][-1][1] == pytest.approx(all_results["eval_loss"], rel=1e-6)
  texts = helpers.tensorboard_texts(output_dir / "runs")
  assert '"max_steps": 6' in texts["run_config/text_summary"][0]
  assert (output_dir / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_eval_only_from_the_trained_output_dir_reproduces_the_eval_results(tiny_run):
  output_dir = tiny_run["output_dir"]
  before = read_json(output_dir / "eval_results.json")
  eval_dir = tiny_run["root"] / "eval_only"
  status = train.main([
      "--model_name_or_path", str(output_dir), "--validation_file",
      tiny_run["data"]["validation"], *tiny_run["data_flags"], "--do_eval",
      "--predict_with_generate", "--output_dir", str(eval_dir),
      "--per_device_eval_batch_size", "3"])
  assert status == 0
  after = read_json(eval_dir / "eval_results.json")
  assert after["eval_samples"] == 7
  # A different eval batch size; the token-weighted loss and the summaries are the same.
  assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)
  for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_gen_len"):
    assert after[key] == pytest.approx(before[key], abs=1e-4), key
  assert not (eval_dir / "train_results.json").exists()
  assert not (eval_dir / "model.safetensors").exists()


def test_predict_only_in_the_output_dir_uses_the_trained_model(tiny_run):
  output_dir = tiny_run["output_dir"]
  expected = (output_dir / "generated_predictions.txt").read_text()
  (output_dir / "generated_predictions.txt").unlink()
  status = train.main([
      "--test_file", tiny_run["data"]["test"], *tiny_run["data_flags"], "--do_predict",
      "--predict_with_generate", "--output_dir", str(output_dir)])
  assert status == 0
  assert (output_dir / "generated_predictions.txt").read_text() == expected
  assert read_json(output_dir / "predict_results.json")["predict_samples"] == 5
  # The training run's results stay in all_results.json.
  all_results = read_json(output_dir / "all_results.json")
  assert all_results["predict_samples"] == 5 and "train_loss" in all_results


def test_a_non_empty_output_dir_without_checkpoints_is_not_overwritten(tiny_run, tmp_path,
                                                                       capsys):
  output_dir = tmp_path / "taken"
  output_dir.mkdir()
  (output_dir / "notes.txt").write_text("mine")
  status = train.main([*tiny_run["train_flags"], "--do_train", "--output_dir", str(output_dir)])
  assert status == 2
  error = capsys.readouterr().err.strip()
  assert error == (f"error: --output_dir {output_dir} is not empty and holds no checkpoint to "
                   "resume: pass --overwrite_output_dir to write over it or choose another "
                   "--output_dir")
  assert os.listdir(output_dir) == ["notes.txt"]


def final_weights(output_dir):
  return (output_dir / "model.safetensors").read_bytes()


def test_resuming_from_the_latest_checkpoint_in_output_dir_is_exact(tiny_run, tmp_path, capsys):
  # An interrupted run: only the step-3 checkpoint of the 6-step run survived.
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(tiny_run["output_dir"] / "checkpoints" / "3",
                  resumed_dir / "checkpoints" / "3")
  status = train.main([*tiny_run["train_flags"], "--do_train", "--output_dir", str(resumed_dir)])
  assert status == 0
  assert (f"Resuming from checkpoint {resumed_dir.resolve()}/checkpoints/3 at step 3"
          in capsys.readouterr().out)
  assert final_weights(resumed_dir) == final_weights(tiny_run["output_dir"])
  original = read_json(tiny_run["output_dir"] / "train_results.json")
  resumed = read_json(resumed_dir / "train_results.json")
  assert resumed["train_loss"] == pytest.approx(original["train_loss"], rel=1e-12)
  log = [json.loads(line) for line in (resumed_dir / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [4, 6]
  assert sorted(p.name for p in (resumed_dir / "checkpoints").iterdir()) == ["3", "6"]


def test_resume_from_checkpoint_with_overwrite_output_dir_is_exact(tiny_run, tmp_path):
  # The seed's second way to resume passes both flags.
  other_dir = tmp_path / "other"
  other_dir.mkdir()
  (other_dir / "stale.txt").write_text("old")
  status = train.main([
      *tiny_run["train_flags"], "--do_train", "--output_dir", str(other_dir),
      "--overwrite_output_dir", "--resume_from_checkpoint",
      str(tiny_run["output_dir"] / "checkpoints" / "3")])
  assert status == 0
  assert final_weights(other_dir) == final_weights(tiny_run["output_dir"])


def test_resuming_with_another_global_batch_is_refused(tiny_run, tmp_path, capsys):
  status = train.main([
      *tiny_run["train_flags"], "--do_train", "--per_device_train_batch_size", "1",
      "--output_dir", str(tmp_path / "x"), "--resume_from_checkpoint",
      str(tiny_run["output_dir"] / "checkpoints" / "3")])
  assert status == 2
  error = capsys.readouterr().err.strip()
  assert "was trained with global_batch_size 16, this run has 8" in error
  assert len(error.splitlines()) == 1


def run_cli(*args, cwd):
  env = dict(os.environ)
  return subprocess.run([sys.executable, "-m", "flax_sum.train", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_an_unknown_flag_fails_with_a_suggestion_and_no_traceback(tmp_path):
  result = run_cli("--learnig_rate", "1e-4", cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: unknown flag --learnig_rate: did you mean "
                                   "--learning_rate?")
  assert "Traceback" not in result.stdout + result.stderr


def test_the_embedded_default_runs_a_few_steps_through_the_cli(tmp_path):
  output_dir = tmp_path / "default"
  result = run_cli("--max_steps", "2", "--logging_steps", "1", "--max_train_samples", "64",
                   "--max_eval_samples", "5", "--max_predict_samples", "3",
                   "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
                   "--val_max_target_length", "6", "--num_beams", "2",
                   "--no_repeat_ngram_size", "2", "--output_dir", str(output_dir),
                   cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [1, 2]
  results = read_json(output_dir / "all_results.json")
  assert results["eval_samples"] == 5 and results["predict_samples"] == 3
  assert "eval_rougeLsum" in results and "predict_rouge1" in results
  assert len((output_dir / "generated_predictions.txt").read_text().splitlines()) == 3
  config = read_json(output_dir / "config.json")
  assert config["d_model"] == read_json(REPO_ROOT / "flax_sum/assets/t5-mini/config.json")[
      "d_model"]
  run_config = read_json(output_dir / "run_config.json")
  assert run_config["source_prefix"] == "summarize: " and run_config["max_steps"] == 2
  # The generation settings used in eval are saved with the model (max_length counts the start).
  generation_config = read_json(output_dir / "generation_config.json")
  assert generation_config["num_beams"] == 2 and generation_config["max_length"] == 6
  assert generation_config["no_repeat_ngram_size"] == 2
  assert generation_config["early_stopping"] is False


def test_a_corrupt_latest_checkpoint_is_skipped_and_kept(tiny_run, tmp_path, capsys):
  resumed_dir = tmp_path / "corrupt"
  for step in ("3", "6"):
    shutil.copytree(tiny_run["output_dir"] / "checkpoints" / step,
                    resumed_dir / "checkpoints" / step)
  # Truncate the largest file of step 6's state, as a crash mid-copy or a full disk would.
  state_files = [p for p in (resumed_dir / "checkpoints" / "6" / "state").rglob("*")
                 if p.is_file()]
  largest = max(state_files, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:len(largest.read_bytes()) // 3])
  status = train.main([*tiny_run["train_flags"], "--do_train", "--output_dir", str(resumed_dir)])
  assert status == 0
  out = capsys.readouterr().out
  assert f"Skipping checkpoint {resumed_dir.resolve()}/checkpoints/6" in out
  assert "at step 3" in out
  assert final_weights(resumed_dir) == final_weights(tiny_run["output_dir"])
  # The unreadable checkpoint was set aside, not deleted.
  assert sorted(p.name for p in (resumed_dir / "checkpoints").iterdir()) == ["3", "6",
                                                                             "stale-6"]


def _train_step_that(monkeypatch, at_step, action):
  """Wraps the pmapped train step so that `action(metrics)` runs after step `at_step`."""
  real = steps.pmap_train_step

  def wrapped_pmap_train_step(*args, **kwargs):
    p_train_step = real(*args, **kwargs)

    def step_fn(state, batch, rng):
      new_state, metrics = p_train_step(state, batch, rng)
      if int(new_state.step[0]) == at_step:
        metrics = action(metrics)
      return new_state, metrics
    return step_fn

  monkeypatch.setattr(steps, "pmap_train_step", wrapped_pmap_train_step)


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_exactly(tiny_run, tmp_path,
                                                                   monkeypatch, capsys):
  output_dir = tmp_path / "preempted"

  def preempt(metrics):
    os.kill(os.getpid(), signal.SIGTERM)
    return metrics

  _train_step_that(monkeypatch, 4, preempt)
  status = train.main([*tiny_run["train_flags"], "--do_train", "--output_dir", str(output_dir)])
  assert status == 128 + signal.SIGTERM
  error = capsys.readouterr().err.strip()
  assert error.startswith("stopped: stopped by SIGTERM after step 4 of 6; checkpoint saved in")
  assert error.endswith("run the same command again to resume")
  assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["3", "4"]
  assert not (output_dir / "model.safetensors").exists()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # The handler was put back.

  monkeypatch.undo()
  status = train.main([*tiny_run["train_flags"], "--do_train", "--output_dir", str(output_dir)])
  assert status == 0
  assert "at step 4" in capsys.readouterr().out
  assert final_weights(output_dir) == final_weights(tiny_run["output_dir"])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoints(tiny_run, tmp_path,
                                                                        monkeypatch, capsys):
  output_dir = tmp_path / "diverged"
  _train_step_that(monkeypatch, 5, lambda metrics: {**metrics, "loss": metrics["loss"] * np.nan})
  status = train.main([*tiny_run["train_flags"], "--do_train", "--output_dir", str(output_dir)])
  assert status == 1
  error = capsys.readouterr().err.strip()
  assert error.startswith("stopped: the training loss is not finite at step 5;")
  assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["3"]
  assert not (output_dir / "model.safetensors").exists()


def test_chaos_kill_9_and_sigterm_at_random_steps_then_rerun_ends_with_identical_weights(
    tiny_run, tmp_path):
  flags = [*tiny_run["train_flags"], "--do_train", "--max_steps", "80", "--save_steps", "6",
           "--logging_steps", "1"]
  reference_dir = tmp_path / "uninterrupted"
  assert train.main([*flags, "--output_dir", str(reference_dir)]) == 0

  killed_dir = tmp_path / "killed"
  log_path = killed_dir / "train_log.jsonl"
  # The reruns share their compiled steps.
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  rng = np.random.default_rng(20261124)
  # Ten interruptions at random steps, each past where the previous one left off.
  kill_steps = sorted(int(step) for step in rng.choice(np.arange(4, 78), 10, replace=False))
  signals = rng.choice([signal.SIGKILL, signal.SIGTERM], 10)
  for kill_after_step, kill_signal in zip(kill_steps, signals):
    process = subprocess.Popen([sys.executable, "-m", "flax_sum.train", *flags,
                                "--output_dir", str(killed_dir)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last_step = 0
    while process.poll() is None and last_step < kill_after_step:
      if log_path.exists():
        lines = log_path.read_text().splitlines()
        last_step = json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0
    # SIGKILL: no handler runs and a checkpoint write may be cut short; SIGTERM: the run
    # saves after its current step and exits with 128 + 15.
    process.send_signal(kill_signal)
    process.wait(timeout=120)
    expected_code = -signal.SIGKILL if kill_signal == signal.SIGKILL else 128 + signal.SIGTERM
    assert process.returncode == expected_code, (kill_after_step, kill_signal)
    assert not (killed_dir / "model.safetensors").exists()
    # Every checkpoint a rerun could pick is complete (partial writes never get a step name).
    for step_dir in (killed_dir / "checkpoints").iterdir():
      if step_dir.name.isdigit():
        checkpoints.load_params(step_dir)

  assert train.main([*flags, "--output_dir", str(killed_dir)]) == 0
  assert final_weights(killed_dir) == final_weights(reference_dir)


def step_dir_names(output_dir):
  return sorted((p.name for p in (output_dir / "checkpoints").iterdir()),
                key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else name))


def test_save_total_limit_keeps_the_newest_and_never_the_stale_ones(tiny_run, tmp_path,
                                                                    monkeypatch):
  resumed_dir = tmp_path / "limited"
  shutil.copytree(tiny_run["output_dir"] / "checkpoints" / "3",
                  resumed_dir / "checkpoints" / "3")
  (resumed_dir / "checkpoints" / "stale-5").mkdir()
  deletions = []  # (deleted step, the newer complete checkpoints at that moment)
  real_delete = checkpoints.delete_checkpoint

  def recording_delete(step_dir):
    step = int(step_dir.name)
    deletions.append((step, [s for s in checkpoints.saved_steps(resumed_dir) if s > step]))
    real_delete(step_dir)

  monkeypatch.setattr(checkpoints, "delete_checkpoint", recording_delete)
  status = train.main([*tiny_run["train_flags"], "--do_train", "--save_steps", "1",
                       "--save_total_limit", "2", "--output_dir", str(resumed_dir)])
  assert status == 0
  assert step_dir_names(resumed_dir) == ["5", "6", "stale-5"]
  # The checkpoint the run resumed from went only once two newer ones were complete.
  assert deletions == [(3, [4, 5]), (4, [5, 6])]
  assert final_weights(resumed_dir) == final_weights(tiny_run["output_dir"])


def flat_params(params):
  return jax.tree_util.tree_flatten_with_path(params)[0]


def assert_same_params(actual, expected):
  actual, expected = flat_params(actual), flat_params(expected)
  assert [path for path, _ in actual] == [path for path, _ in expected]
  for (path, a), (_, b) in zip(actual, expected):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def best_model_run(tiny_run, tmp_path_factory):
  """6 steps, each evaluated and saved, at most 3 checkpoints kept. The loss falls at every step
  here, so asking for the greatest makes an early checkpoint the best: one that retention would
  delete if it did not protect the best."""
  flags = [*tiny_run["train_flags"], "--validation_file", tiny_run["data"]["validation"],
           "--do_train", "--do_eval", "--eval_steps", "1", "--save_steps", "1",
           "--save_total_limit", "3", "--load_best_model_at_end",
           "--metric_for_best_model", "eval_loss", "--greater_is_better", "true"]
  output_dir = tmp_path_factory.mktemp("best") / "out"
  assert train.main([*flags, "--output_dir", str(output_dir)]) == 0
  return {"flags": flags, "output_dir": output_dir}


def test_load_best_model_at_end_exports_the_best_checkpoint_which_retention_keeps(
    best_model_run):
  output_dir = best_model_run["output_dir"]
  log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
  eval_records = [r for r in log if "eval_loss" in r]
  assert [r["step"] for r in eval_records] == [1, 2, 3, 4, 5, 6]
  best_record = max(eval_records, key=lambda r: r["eval_loss"])  # The first of equals.
  best_step = best_record["step"]
  assert best_step < 4, "the best must be a checkpoint that only the best-model rule keeps"
  assert step_dir_names(output_dir) == [str(best_step), "5", "6"]

  best_dir = (output_dir / "checkpoints" / str(best_step)).resolve()
  train_results = read_json(output_dir / "train_results.json")
  assert train_results["best_model_checkpoint"] == str(best_dir)
  assert train_results["best_metric"] == best_record["eval_loss"]
  _, exported = hf_checkpoint.load_pretrained(str(output_dir))
  assert_same_params(exported, checkpoints.load_params(best_dir)[1])
  _, last = checkpoints.load_params(output_dir / "checkpoints" / "6")
  assert not all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat_params(exported),
                                                                 flat_params(last)))
  # do_eval evaluated the best checkpoint's params, not the last step's.
  eval_results = read_json(output_dir / "eval_results.json")
  assert eval_results["eval_loss"] == pytest.approx(best_record["eval_loss"], rel=1e-6)


def test_the_best_checkpoint_survives_a_resume(best_model_run, tmp_path, capsys):
  reference_dir = best_model_run["output_dir"]
  best_step = pathlib.Path(read_json(reference_dir / "train_results.json")[
      "best_model_checkpoint"]).name
  # Interrupted after step 5 of 6: what retention had left then.
  resumed_dir = tmp_path / "resumed"
  for step in (best_step, "5"):
    shutil.copytree(reference_dir / "checkpoints" / step, resumed_dir / "checkpoints" / step)
  assert train.main([*best_model_run["flags"], "--output_dir", str(resumed_dir)]) == 0
  out = capsys.readouterr().out
  best_dir = (resumed_dir / "checkpoints" / best_step).resolve()
  assert f"Best checkpoint so far: {best_dir} (eval_loss" in out
  assert f"Best checkpoint: step {best_step} (eval_loss" in out
  assert step_dir_names(resumed_dir) == step_dir_names(reference_dir)
  resumed = read_json(resumed_dir / "train_results.json")
  assert resumed["best_model_checkpoint"] == str(best_dir)
  assert resumed["best_metric"] == read_json(reference_dir / "train_results.json")["best_metric"]
  assert final_weights(resumed_dir) == final_weights(reference_dir)


@pytest.mark.parametrize("flags, message", [
    (["--load_best_model_at_end"],
     "--load_best_model_at_end needs evaluation during training: pass --eval_steps N (with "
     "--save_steps a multiple of N)"),
    (["--load_best_model_at_end", "--eval_steps", "2", "--do_eval=false"],
     "--load_best_model_at_end needs evaluation during training: pass --do_eval and "
     "--eval_steps N"),
    (["--load_best_model_at_end", "--eval_steps", "2", "--save_steps", "3"],
     "--load_best_model_at_end needs --save_steps to be a multiple of --eval_steps, got 3 and "
     "2: pass --save_steps 4 (or an --eval_steps that divides 3)"),
    (["--load_best_model_at_end", "--eval_steps", "2", "--save_steps", "4",
      "--metric_for_best_model", "bleu"],
     "--metric_for_best_model bleu is not an evaluation metric: choose one of loss, accuracy, "
     "rouge1, rouge2, rougeL, rougeLsum, gen_len (eval_ prefix optional)"),
    (["--load_best_model_at_end", "--eval_steps", "2", "--save_steps", "4",
      "--metric_for_best_model", "eval_rougeL"],
     "--metric_for_best_model eval_rougeL is computed only on generated summaries: pass "
     "--predict_with_generate or choose loss or accuracy"),
])
def test_best_model_settings_that_cannot_work_are_refused(tmp_path, capsys, flags, message):
  output_dir = tmp_path / "out"
  status = train.main(["--train_file", str(tmp_path / "train.csv"), "--validation_file",
                       str(tmp_path / "dev.csv"), "--do_train", "--do_eval", *flags,
                       "--output_dir", str(output_dir)])
  assert status == 2
  assert capsys.readouterr().err == f"error: {message}\n"
  assert not output_dir.exists()


def test_a_single_device_run_resumes_exactly(tiny_run, tmp_path):
  """The other resume tests run on 8 devices; here jax sees one, in a process of its own."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                             env.get("XLA_FLAGS", "")) + " --xla_force_host_platform_device_count=1")
  # The second process reuses the first one's compiled train step.
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax-cache")

  def run(output_dir):
    result = subprocess.run([sys.executable, "-m", "flax_sum.train", *tiny_run["train_flags"],
                             "--do_train", "--output_dir", str(output_dir)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

  uninterrupted_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
  assert "global batch 2 on 1 devices" in run(uninterrupted_dir)
  # Interrupted after step 3 of 6: only its checkpoint survived.
  shutil.copytree(uninterrupted_dir / "checkpoints" / "3", resumed_dir / "checkpoints" / "3")
  assert "at step 3" in run(resumed_dir)
  assert final_weights(resumed_dir) == final_weights(uninterrupted_dir)
  assert (read_json(resumed_dir / "train_results.json")["train_loss"]
          == read_json(uninterrupted_dir / "train_results.json")["train_loss"])


def test_running_out_of_device_memory_is_one_line_and_keeps_the_checkpoints(
    tiny_run, tmp_path, capsys, monkeypatch):
  output_dir = tmp_path / "out"
  shutil.copytree(tiny_run["output_dir"] / "checkpoints" / "3", output_dir / "checkpoints" / "3")

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.")

  monkeypatch.setattr(steps, "pmap_train_step", lambda *args, **kwargs: out_of_memory)
  code = train.main([*tiny_run["train_flags"], "--do_train", "--output_dir", str(output_dir)])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err == (
      "error: the devices ran out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to "
      "allocate 8589934592 bytes.): lower --per_device_train_batch_size or "
      "--per_device_eval_batch_size (raise --gradient_accumulation_steps to keep the global "
      "batch), shorten --max_source_length, or use --bf16; the checkpoints saved so far are kept")
  assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["3"]
  assert not (output_dir / "model.safetensors").exists()


NO_SPACE = OSError(errno.ENOSPC, "No space left on device")
# How tensorstore reports a full disk when Orbax's background write of the arrays fails.
TENSORSTORE_NO_SPACE = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "opt_state.0.mu" in OCDBT database: Failed to write 4096 '
    "bytes to file 11: No space left on device [os_error_code='28']")


def _fail_saving_step(patch, failing_step, fails_at):
  """The save of `failing_step` leaves Orbax's temporary directory and fails for a full disk:
  when it starts ("save") or, as Orbax's async writes do, when it is waited for ("wait")."""
  real_save = checkpoints.save

  def failing_save(manager, step, *args, **kwargs):
    if step != failing_step:
      return real_save(manager, step, *args, **kwargs)
    partial = pathlib.Path(manager.directory) / f"{step}.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    (partial / "chunk").write_bytes(b"partial")
    if fails_at == "save":
      raise NO_SPACE

    def failing_wait():
      try:
        raise TENSORSTORE_NO_SPACE
      except ValueError:  # Orbax logs the failure with its traceback, then raises it.
        logging.getLogger("absl").exception("Save Finalize thread (save_finalize) failed.")
        raise
    patch.setattr(manager, "wait_until_finished", failing_wait)

  patch.setattr(checkpoints, "save", failing_save)


@pytest.mark.parametrize("fails_at", ["save", "wait"])
def test_a_full_disk_while_saving_a_checkpoint_keeps_the_earlier_one_and_the_rerun_resumes(
    tiny_run, tmp_path, capsys, monkeypatch, fails_at):
  output_dir = tmp_path / "out"
  command = [*tiny_run["train_flags"], "--do_train", "--output_dir", str(output_dir)]
  with monkeypatch.context() as patch:
    _fail_saving_step(patch, 6, fails_at)
    assert train.main(command) == 2
  captured = capsys.readouterr()
  directory = checkpoints.checkpoint_dir(output_dir)
  error = captured.err.strip()
  assert "\n" not in error and "Traceback" not in captured.err + captured.out
  assert re.fullmatch(
      re.escape(f"error: no space left on device while saving checkpoint 6 to {directory} (")
      + r"[0-9.]+ [MG]iB free" + re.escape(
          "): free disk space or keep fewer checkpoints with --save_total_limit, then run the "
          "same command again to resume from step 3"), error), error
  # The partial save is gone; the earlier checkpoint is whole.
  assert step_dir_names(output_dir) == ["3"]
  assert checkpoints.saved_steps(output_dir) == [3]
  checkpoints.load_params(directory / "3")
  assert not (output_dir / "model.safetensors").exists()

  assert train.main(command) == 0
  assert "at step 3" in capsys.readouterr().out
  assert final_weights(output_dir) == final_weights(tiny_run["output_dir"])


def test_a_full_disk_while_writing_the_model_is_one_line_and_the_rerun_writes_it(
    tiny_run, tmp_path, capsys, monkeypatch):
  output_dir = tmp_path / "out"
  shutil.copytree(tiny_run["output_dir"] / "checkpoints" / "3", output_dir / "checkpoints" / "3")
  command = [*tiny_run["train_flags"], "--do_train", "--output_dir", str(output_dir)]

  def no_space(tensors, path, metadata=None):
    pathlib.Path(path).write_bytes(b"partial")
    raise safetensors.SafetensorError(  # What safetensors raises for a full disk.
        "Error while serializing: I/O error: No space left on device (os error 28)")

  with monkeypatch.context() as patch:
    patch.setattr(safetensors.numpy, "save_file", no_space)
    assert train.main(command) == 2
  captured = capsys.readouterr()
  assert "Traceback" not in captured.err + captured.out
  assert re.fullmatch(
      re.escape(f"error: no space left on device while writing the trained model to {output_dir}")
      + r" \([0-9.]+ [MG]iB free" + re.escape(
          "): free disk space, then run the same command again to write it from the last "
          "checkpoint (step 6)"), captured.err.strip()), captured.err
  assert not [name for name in os.listdir(output_dir) if "safetensors" in name]

  # The rerun resumes at the last step, trains nothing and writes the model.
  assert train.main(command) == 0
  assert "at step 6" in capsys.readouterr().out
  assert final_weights(output_dir) == final_weights(tiny_run["output_dir"])


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  code = train.main(["--do_train", "--output_dir", str(blocker / "out"), "--max_steps", "1"])
  assert code == 2
  assert capsys.readouterr().err.strip() == (
      f"error: --output_dir {blocker / 'out'} cannot be created (Not a directory): choose a "
      "directory you can write to")
  assert blocker.read_text() == "not a directory"
