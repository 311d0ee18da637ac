"""What a training run shows besides `train_log.jsonl`, all on process 0 only.

- TensorBoard event files in `output_dir/runs` (Hugging Face's logging_dir): every train-log
  record as scalars (`train/loss`, `eval/rouge1`, ...) against the step, the run config and
  the package versions as text.
- `report.png`: loss, learning rate and ROUGE against the step, drawn from `train_log.jsonl`.
- tqdm progress bars for training, evaluation and prediction when stdout and stderr are both
  terminals; otherwise the plain log lines alone, which read well in a file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import pathlib
import platform
import sys
from typing import Any, Iterable, Iterator

import datasets
import jax
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from flax_sum import env

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
REPORT_FILE = "report.png"
TRAIN_LOG_FILE = "train_log.jsonl"
EVENT_FILE_PATTERN = "events.out.tfevents.*"
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Hugging Face's TensorBoardCallback names: eval_loss -> eval/loss, anything unprefixed -> train/.
TAG_PREFIXES = ("eval", "predict")
PANEL_SIZE_INCHES = (5.0, 3.8)
REPORT_DPI = 100

# tensorboardX names event files by the second and host; two writers of one second would share
# (and truncate) a file without a suffix of their own.
_writer_numbers = itertools.count()


def is_main_process() -> bool:
  return jax.process_index() == 0


def _is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # No isatty, or a closed stream.
    return False


def bars_enabled() -> bool:
  """Progress bars only on process 0 and only when stdout (the log) and stderr (the bars) are
  both terminals: redirected to a file, a run keeps its plain log lines."""
  return is_main_process() and _is_terminal(sys.stdout) and _is_terminal(sys.stderr)


def quiet_datasets_bars() -> None:
  """Turns off the `datasets` library's own bars (tokenization) where ours are off."""
  if not bars_enabled():
    datasets.disable_progress_bars()


def progress_bar(iterable: Iterable | None = None, **kwargs) -> tqdm:
  """A tqdm bar that is disabled (a plain pass-through) where `bars_enabled()` is false."""
  return tqdm(iterable, disable=not bars_enabled(), dynamic_ncols=True, **kwargs)


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
  """{tag: value} of a record's numeric fields except `step`: `eval_x` -> `eval/x`,
  `predict_x` -> `predict/x`, any other `x` -> `train/x`."""
  scalars = {}
  for key, value in record.items():
    if key == "step" or isinstance(value, bool):
      continue
    try:
      value = float(value)
    except (TypeError, ValueError):
      continue
    prefix = next((p for p in TAG_PREFIXES if key.startswith(f"{p}_")), None)
    tag = f"{prefix}/{key[len(prefix) + 1:]}" if prefix else f"train/{key}"
    scalars[tag] = value
  return scalars


def _code_block(text: str) -> str:
  # TensorBoard renders text as Markdown; indented lines keep the JSON's layout.
  return "\n".join(f"    {line}" for line in text.splitlines())


def versions_markdown() -> str:
  rows = [("python", platform.python_version()), *env.package_versions().items()]
  return "\n".join(["| package | version |", "|---|---|",
                    *(f"| {name} | {version or 'not installed'} |" for name, version in rows)])


def _open_writer(runs_dir: pathlib.Path, purge_step: int | None = None):
  """A tensorboardX SummaryWriter on a new event file in `runs_dir`, or None with a warning."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    log.warning("tensorboardX is not installed, so nothing is written to %s: "
                "pip install 'tensorboardX>=2.6'", runs_dir)
    return None
  runs_dir.mkdir(parents=True, exist_ok=True)
  return SummaryWriter(str(runs_dir), purge_step=purge_step,
                       filename_suffix=f".{os.getpid()}.{next(_writer_numbers)}")


def _write_scalars(writer, record: dict[str, Any]) -> None:
  step = int(record["step"])
  for tag, value in scalar_tags(record).items():
    writer.add_scalar(tag, value, global_step=step)
  # Records come every logging step, so flushing each one costs little and a run that is
  # stopped or killed keeps everything it logged.
  writer.flush()


class TrainMonitor:
  """TensorBoard and the training progress bar for the step loop; a context manager.

  A fresh run replaces the event files of an earlier one in `runs/` (as `train_log.jsonl` is
  rewritten); a resumed run adds a new event file whose purge step hides what an interrupted
  attempt logged after the resumed checkpoint, so TensorBoard shows each step once.
  """

  def __init__(self, output_dir: pathlib.Path, *, run_config: dict[str, Any] | None,
               start_step: int, total_steps: int, resumed: bool):
    self.start_step, self.total_steps = start_step, total_steps
    self.writer = None
    if is_main_process():
      runs_dir = pathlib.Path(output_dir) / RUNS_DIR
      if not resumed:
        for stale in runs_dir.glob(EVENT_FILE_PATTERN):
          stale.unlink()
      self.writer = _open_writer(runs_dir, purge_step=start_step + 1 if resumed else None)
    if self.writer is not None:
      if run_config is not None:
        self.writer.add_text("run_config", _code_block(
            json.dumps(run_config, indent=2, sort_keys=True)), global_step=start_step)
      self.writer.add_text("versions", versions_markdown(), global_step=start_step)
      self.writer.flush()
    # The bar is shown from __enter__ on, once log lines are redirected to print above it.
    self.bar = tqdm(disable=True)
    self._log_redirect = contextlib.nullcontext()

  def __enter__(self):
    if bars_enabled():
      self._log_redirect = logging_redirect_tqdm()
      self._log_redirect.__enter__()
    self.bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", unit="step",
                    disable=not bars_enabled(), dynamic_ncols=True)
    return self

  def __exit__(self, *exc_info):
    self.close()
    self._log_redirect.__exit__(*exc_info)

  def steps(self) -> Iterator[int]:
    """The step numbers still to run, start_step + 1 to total_steps, each counted by the bar
    once its body has run."""
    for step in range(self.start_step + 1, self.total_steps + 1):
      yield step
      self.bar.update(1)

  def write(self, record: dict[str, Any]) -> None:
    """One train-log record: scalars to TensorBoard, a training record's loss to the bar."""
    if self.writer is not None:
      _write_scalars(self.writer, record)
    if "loss" in record and not self.bar.disable:
      postfix = f"loss {record['loss']:.4g}"
      if "tokens_per_second" in record:
        postfix += f", {record['tokens_per_second']:,.0f} tokens/s"
      self.bar.set_postfix_str(postfix, refresh=False)

  def close(self) -> None:
    self.bar.close()
    if self.writer is not None:
      self.writer.close()
      self.writer = None


def read_train_log(path: pathlib.Path) -> list[dict[str, Any]]:
  """The records of a train_log.jsonl; a line cut short by a killed run is skipped."""
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
      records.append(record)
  return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`, by step; where a resumed run logged a step again, its record
  wins over the interrupted attempt's."""
  by_step = {}
  for record in records:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      by_step[int(record["step"])] = float(value)
  steps = sorted(by_step)
  return steps, [by_step[step] for step in steps]


def _panels(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The panels that have data: {title, ylabel, lines: [(label, steps, values, style)]}."""
  train_style = {"marker": "o", "markersize": 2.5, "linewidth": 1.5}
  eval_style = {"marker": "o", "markersize": 5, "linewidth": 1.5}
  candidates = [
      {"title": "Loss", "ylabel": "cross-entropy per token",
       "lines": [("train", *series(records, "loss"), train_style),
                 ("eval", *series(records, "eval_loss"), eval_style)]},
      {"title": "Learning rate", "ylabel": "learning rate", "scientific": True, "legend": False,
       "lines": [("learning rate", *series(records, "learning_rate"), train_style)]},
      {"title": "ROUGE on the validation set", "ylabel": "F-measure x 100",
       "lines": [(key, *series(records, f"eval_{key}"), eval_style) for key in ROUGE_KEYS]},
  ]
  panels = []
  for panel in candidates:
    panel["lines"] = [line for line in panel["lines"] if line[1]]
    if panel["lines"]:
      panels.append(panel)
  return panels


def draw_report(path: pathlib.Path, records: list[dict[str, Any]], title: str = "") -> bool:
  """Draws the panels that have data side by side into `path` (PNG); False if none has."""
  # The object-oriented API draws with Agg without touching pyplot's global backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = _panels(records)
  if not panels:
    return False
  width, height = PANEL_SIZE_INCHES
  figure = Figure(figsize=(width * len(panels), height), dpi=REPORT_DPI, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, len(panels), squeeze=False)[0]
  for ax, panel in zip(axes, panels):
    for label, steps, values, style in panel["lines"]:
      ax.plot(steps, values, label=label, **style)
    ax.set_title(panel["title"])
    ax.set_xlabel("step")
    ax.set_ylabel(panel["ylabel"])
    ax.grid(True, alpha=0.3)
    if panel.get("scientific"):
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if panel.get("legend", True):
      ax.legend(loc="best", fontsize="small")
  if title:
    figure.suptitle(title)
  # Written aside and renamed, so a failed draw never leaves a broken report.png.
  partial = path.with_name(f".{path.name}.partial")
  figure.savefig(partial, format="png")
  os.replace(partial, path)
  return True


def write_report(output_dir: pathlib.Path, extra_records: Iterable[dict[str, Any]] = ()
                 ) -> pathlib.Path | None:
  """`output_dir/report.png` from its train_log.jsonl (plus `extra_records`); process 0 only.
  Never raises: a failure to draw is a warning, as the run's results matter more."""
  if not is_main_process():
    return None
  output_dir = pathlib.Path(output_dir)
  path = output_dir / REPORT_FILE
  try:
    records = read_train_log(output_dir / TRAIN_LOG_FILE) + list(extra_records)
    steps = [int(r["step"]) for r in records]
    title = (f"{output_dir.resolve().name}: steps {min(steps)} to {max(steps)}"
             if steps else output_dir.resolve().name)
    if not draw_report(path, records, title):
      log.info("Nothing to draw in %s yet: %s has no loss, learning rate or ROUGE", path,
               TRAIN_LOG_FILE)
      return None
  except Exception as error:  # Drawing is a convenience: it must never fail the run.
    log.warning("Could not draw %s (%s: %s); the run's results are unaffected", path,
                type(error).__name__, error)
    with contextlib.suppress(OSError):
      path.with_name(f".{path.name}.partial").unlink()
    return None
  log.info("Drew the training report %s", path)
  return path


def finish_training(output_dir: pathlib.Path, results: dict[str, Any]) -> None:
  """After training and its final evaluation: the `eval_` metrics of `results` go to
  TensorBoard and the report at the last logged step (as the Hugging Face Trainer logs its
  final evaluation), then report.png is drawn. Process 0 only."""
  if not is_main_process():
    return
  output_dir = pathlib.Path(output_dir)
  extra_records = []
  final_eval = {key: value for key, value in results.items() if key.startswith("eval_")}
  steps = [int(r["step"]) for r in read_train_log(output_dir / TRAIN_LOG_FILE)]
  if final_eval and steps:
    record = {"step": max(steps), **final_eval}
    extra_records.append(record)
    try:
      writer = _open_writer(output_dir / RUNS_DIR)
      if writer is not None:
        _write_scalars(writer, record)
        writer.close()
    except OSError as error:
      log.warning("Could not write the final evaluation to %s: %s", output_dir / RUNS_DIR,
                  error)
  write_report(output_dir, extra_records)
