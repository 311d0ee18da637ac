"""TensorBoard event files, report.png and progress bars, from synthetic train-log records."""

import io
import json
import logging
import struct

import jax
import matplotlib.figure
import pytest

import helpers
from flax_sum import reporting
from flax_sum import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_record(step, loss):
  return {"step": step, "loss": loss, "learning_rate": 1e-3 * step / 100, "grad_norm": 0.5,
          "tokens_per_second": 3300.0 + step, "epoch": step / 200}


def eval_record(step, loss):
  return {"step": step, "eval_loss": loss, "eval_accuracy": 0.3, "eval_rouge1": 20.0 + step / 10,
          "eval_rouge2": 2.0, "eval_rougeL": 15.0, "eval_rougeLsum": 17.0, "eval_gen_len": 29.4,
          "eval_samples": 7}


def write_log(path, records):
  path.write_text("".join(json.dumps(record) + "\n" for record in records))


def png_size(path):
  """(width, height) from a PNG's IHDR chunk, after checking the signature."""
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def panel_width(panels):
  return int(reporting.PANEL_SIZE_INCHES[0] * panels * reporting.REPORT_DPI)


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_every_train_log_record_goes_to_tensorboard_with_the_config_and_versions(tmp_path):
  monitor = reporting.TrainMonitor(tmp_path, run_config={"learning_rate": 0.003, "max_steps": 4},
                                   start_step=0, total_steps=4, resumed=False)
  train_log = train.TrainLog(tmp_path / "train_log.jsonl", append=False, monitor=monitor)
  with monitor:
    steps_run = []
    for step in monitor.steps():
      steps_run.append(step)
      if step % 2 == 0:
        train_log.write(train_record(step, loss=5.0 - step))
    train_log.write(eval_record(4, loss=1.5))
  train_log.close()

  assert steps_run == [1, 2, 3, 4]
  scalars = helpers.tensorboard_scalars(tmp_path / "runs")
  assert set(scalars) == {
      "train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
      "train/epoch", "eval/loss", "eval/accuracy", "eval/rouge1", "eval/rouge2", "eval/rougeL",
      "eval/rougeLsum", "eval/gen_len", "eval/samples"}
  assert scalars["train/loss"] == [(2, 3.0), (4, 1.0)]
  assert scalars["train/tokens_per_second"] == [(2, 3302.0), (4, 3304.0)]
  assert scalars["eval/loss"] == [(4, 1.5)]
  assert scalars["eval/rouge1"] == [(4, pytest.approx(20.4))]
  # The same records are in train_log.jsonl.
  logged = reporting.read_train_log(tmp_path / "train_log.jsonl")
  assert [r["step"] for r in logged] == [2, 4, 4]

  texts = helpers.tensorboard_texts(tmp_path / "runs")
  (run_config,) = texts["run_config/text_summary"]
  assert json.loads(run_config.replace("\n    ", "\n")) == {"learning_rate": 0.003,
                                                           "max_steps": 4}
  (versions,) = texts["versions/text_summary"]
  for package in ("jax", "flax", "optax", "orbax-checkpoint", "transformers", "flax-sum"):
    assert f"| {package} | " in versions
  assert f"| jax | {jax.__version__} |" in versions


def test_a_resumed_run_adds_an_event_file_and_a_fresh_run_replaces_them(tmp_path):
  with reporting.TrainMonitor(tmp_path, run_config=None, start_step=0, total_steps=6,
                              resumed=False) as interrupted:
    for step in (2, 4, 6):
      interrupted.write(train_record(step, loss=9.0))
  with reporting.TrainMonitor(tmp_path, run_config=None, start_step=4, total_steps=6,
                              resumed=True) as resumed:
    assert list(resumed.steps()) == [5, 6]
    resumed.write(train_record(6, loss=1.0))

  assert len(list((tmp_path / "runs").glob(reporting.EVENT_FILE_PATTERN))) == 2
  # TensorBoard drops what the interrupted attempt logged from step 5 on.
  purges = [event.step for event in helpers.read_event_files(tmp_path / "runs")
            if event.HasField("session_log")]
  assert purges == [5]
  assert helpers.tensorboard_scalars(tmp_path / "runs")["train/loss"] == [
      (2, 9.0), (4, 9.0), (6, 9.0), (6, 1.0)]

  with reporting.TrainMonitor(tmp_path, run_config=None, start_step=0, total_steps=6,
                              resumed=False) as fresh:
    fresh.write(train_record(2, loss=4.0))
  assert len(list((tmp_path / "runs").glob(reporting.EVENT_FILE_PATTERN))) == 1
  assert helpers.tensorboard_scalars(tmp_path / "runs")["train/loss"] == [(2, 4.0)]


def test_only_process_0_writes_tensorboard_and_the_report(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  write_log(tmp_path / "train_log.jsonl", [train_record(2, 3.0)])
  with reporting.TrainMonitor(tmp_path, run_config={}, start_step=0, total_steps=2,
                              resumed=False) as monitor:
    monitor.write(train_record(2, loss=3.0))
  reporting.finish_training(tmp_path, {"eval_loss": 2.0})
  assert not (tmp_path / "runs").exists()
  assert not (tmp_path / "report.png").exists()


def test_the_report_draws_loss_learning_rate_and_rouge_and_logs_the_final_eval(tmp_path):
  records = [train_record(step, loss=8.0 - step / 20) for step in range(20, 101, 20)]
  records += [eval_record(40, loss=6.5), eval_record(80, loss=5.0)]
  write_log(tmp_path / "train_log.jsonl", records)

  reporting.finish_training(tmp_path, {"train_loss": 6.0, "eval_loss": 4.5, "eval_rouge1": 31.0})

  assert png_size(tmp_path / "report.png") == (
      panel_width(3), int(reporting.PANEL_SIZE_INCHES[1] * reporting.REPORT_DPI))
  assert (tmp_path / "report.png").stat().st_size > 10_000
  # The final evaluation (eval_results.json) is logged at the last step; train_* results are not.
  scalars = helpers.tensorboard_scalars(tmp_path / "runs")
  assert scalars == {"eval/loss": [(100, 4.5)], "eval/rouge1": [(100, 31.0)]}
  panels = reporting._panels(records + [{"step": 100, "eval_loss": 4.5, "eval_rouge1": 31.0}])
  assert [panel["title"] for panel in panels] == ["Loss", "Learning rate",
                                                  "ROUGE on the validation set"]
  loss_lines = {label: (steps, values) for label, steps, values, _ in panels[0]["lines"]}
  assert loss_lines["eval"] == ([40, 80, 100], [6.5, 5.0, 4.5])
  assert [label for label, *_ in panels[2]["lines"]] == ["rouge1", "rouge2", "rougeL",
                                                          "rougeLsum"]


def test_a_log_with_only_train_records_still_draws(tmp_path):
  write_log(tmp_path / "train_log.jsonl", [train_record(step, 5.0) for step in (1, 2)])
  assert reporting.write_report(tmp_path) == tmp_path / "report.png"
  assert png_size(tmp_path / "report.png")[0] == panel_width(2)  # Loss and learning rate.


def test_an_empty_log_draws_nothing(tmp_path):
  (tmp_path / "train_log.jsonl").write_text("")
  assert reporting.write_report(tmp_path) is None
  assert not (tmp_path / "report.png").exists()


def test_a_drawing_failure_only_warns(tmp_path, monkeypatch, caplog):
  write_log(tmp_path / "train_log.jsonl", [train_record(2, 5.0)])

  def broken_savefig(self, *args, **kwargs):
    raise RuntimeError("no fonts")
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
  with caplog.at_level(logging.WARNING, logger="flax_sum.reporting"):
    reporting.finish_training(tmp_path, {"eval_loss": 2.0})
  assert "Could not draw" in caplog.text and "RuntimeError: no fonts" in caplog.text
  assert sorted(path.name for path in tmp_path.iterdir()) == ["runs", "train_log.jsonl"]


def test_repeated_steps_of_a_resumed_run_keep_the_latest_and_a_cut_line_is_skipped(tmp_path):
  path = tmp_path / "train_log.jsonl"
  write_log(path, [train_record(2, 9.0), train_record(4, 8.0), train_record(2, 7.0)])
  with path.open("a") as f:
    f.write('{"step": 6, "loss')  # A run killed in the middle of a line.
  records = reporting.read_train_log(path)
  assert reporting.series(records, "loss") == ([2, 4], [7.0, 8.0])
  assert reporting.series(records, "eval_loss") == ([], [])


def test_bars_are_disabled_unless_stdout_and_stderr_are_terminals(monkeypatch):
  monkeypatch.setattr("sys.stdout", io.StringIO())
  monkeypatch.setattr("sys.stderr", FakeTerminal())
  assert not reporting.bars_enabled()
  bar = reporting.progress_bar(range(3), desc="eval")
  assert bar.disable and list(bar) == [0, 1, 2]

  monkeypatch.setattr("sys.stdout", FakeTerminal())
  assert reporting.bars_enabled()
  assert not reporting.progress_bar(range(3)).disable

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert not reporting.bars_enabled()


def test_on_a_terminal_the_training_bar_shows_steps_loss_and_tokens_per_second(tmp_path,
                                                                               monkeypatch):
  stderr = FakeTerminal()
  monkeypatch.setattr("sys.stdout", FakeTerminal())
  monkeypatch.setattr("sys.stderr", stderr)
  with reporting.TrainMonitor(tmp_path, run_config=None, start_step=2, total_steps=4,
                              resumed=True) as monitor:
    assert not monitor.bar.disable
    for step in monitor.steps():
      monitor.write(train_record(step, loss=3.25))
  shown = stderr.getvalue()
  assert "train" in shown and "4/4" in shown
  assert "loss 3.25, 3,304 tokens/s" in shown


def test_the_tokenization_bars_of_datasets_follow_ours(monkeypatch):
  import datasets
  was_enabled = datasets.is_progress_bar_enabled()
  try:
    datasets.enable_progress_bars()
    monkeypatch.setattr("sys.stdout", FakeTerminal())
    monkeypatch.setattr("sys.stderr", FakeTerminal())
    reporting.quiet_datasets_bars()
    assert datasets.is_progress_bar_enabled()
    monkeypatch.setattr("sys.stdout", io.StringIO())
    reporting.quiet_datasets_bars()
    assert not datasets.is_progress_bar_enabled()
  finally:
    (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
