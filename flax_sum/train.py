"""Fine-tune and evaluate a T5 summarizer: `python -m flax_sum.train -h`.

`train_and_evaluate(config, workdir)` reads top to bottom: data, model, the pmapped step loop
with step-based logging, evaluation and checkpoints, then eval/predict and the result files.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from flax import jax_utils

from flax_sum import checkpoints
from flax_sum import cli
from flax_sum import decode
from flax_sum import distributed
from flax_sum import hf_checkpoint
from flax_sum import hub
from flax_sum import input_pipeline
from flax_sum import metrics as metrics_lib
from flax_sum import optim
from flax_sum import reporting
from flax_sum import perf
from flax_sum import steps
from flax_sum.errors import RunStopped, UserError, disk_error, os_error_of
from flax_sum.model import T5, T5Config, init_params

log = logging.getLogger(__name__)

MODEL_FILES = ("config.json", "model.safetensors")
# Evaluation results are named eval_<metric>; the generated ones need --predict_with_generate.
EVAL_METRICS = ("loss", "accuracy")
GENERATED_EVAL_METRICS = (*metrics_lib.ROUGE_TYPES, "gen_len")


def first_replica(tree):
  """Device 0's copy of a replicated tree, read without gathering every replica."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def write_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
  path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills derived values and refuses inconsistent settings, before any work is done."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not (config.do_train or config.do_eval or config.do_predict):
    raise UserError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
  if not config.output_dir:
    raise UserError("no output directory: pass --output_dir DIR")
  if config.val_max_target_length is None:
    config.val_max_target_length = config.max_target_length
  if config.hub_model_id and not config.push_to_hub:
    log.warning("--hub_model_id is used only with --push_to_hub; nothing will be uploaded")
  if config.fp16:
    log.warning("--fp16: T5 overflows in float16, so flax-sum computes in bfloat16 instead "
                "(same memory and speed on GPUs/TPUs that support it)")
    config.dtype = "bfloat16"
  if config.bf16:
    config.dtype = "bfloat16"
  for key in ("dtype", "param_dtype"):
    if config[key] not in ("auto", "float32", "bfloat16"):
      raise UserError(f"--{key} {config[key]!r} is not supported: use float32, bfloat16 or auto")
  for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
              "gradient_accumulation_steps", "max_source_length", "max_target_length",
              "val_max_target_length"):
    if config[key] < 1:
      raise UserError(f"--{key} must be at least 1, got {config[key]}")
  if config.do_train and config.load_best_model_at_end:
    check_evaluated_checkpoints(config.do_eval, config.eval_steps, config.save_steps)
  if config.load_best_model_at_end or config.metric_for_best_model is not None:
    config.metric_for_best_model, config.greater_is_better = best_model_metric(
        config.metric_for_best_model, config.greater_is_better, config.predict_with_generate)
  return config


def check_evaluated_checkpoints(do_eval: bool, eval_steps: int | None, save_steps: int) -> None:
  """--load_best_model_at_end picks among evaluated checkpoints: every save must be evaluated."""
  if not do_eval:
    raise UserError("--load_best_model_at_end needs evaluation during training: pass --do_eval "
                    "and --eval_steps N")
  if not eval_steps or eval_steps < 1:
    raise UserError("--load_best_model_at_end needs evaluation during training: pass "
                    "--eval_steps N (with --save_steps a multiple of N)")
  if save_steps % eval_steps:
    multiple = max(1, math.ceil(save_steps / eval_steps)) * eval_steps
    raise UserError(f"--load_best_model_at_end needs --save_steps to be a multiple of "
                    f"--eval_steps, got {save_steps} and {eval_steps}: pass --save_steps "
                    f"{multiple} (or an --eval_steps that divides {save_steps})")


def best_model_metric(name: str | None, greater_is_better: bool | None,
                      predict_with_generate: bool) -> tuple[str, bool]:
  """(eval results key, greater_is_better) for --metric_for_best_model as Hugging Face reads it:
  loss if None, the eval_ prefix optional, lower is better for a loss unless told otherwise."""
  bare = (name or "loss").removeprefix("eval_")
  if bare not in EVAL_METRICS + GENERATED_EVAL_METRICS:
    raise UserError(f"--metric_for_best_model {name} is not an evaluation metric: choose one of "
                    f"{', '.join(EVAL_METRICS + GENERATED_EVAL_METRICS)} (eval_ prefix "
                    "optional)")
  if bare in GENERATED_EVAL_METRICS and not predict_with_generate:
    raise UserError(f"--metric_for_best_model {name} is computed only on generated summaries: "
                    f"pass --predict_with_generate or choose {' or '.join(EVAL_METRICS)}")
  if greater_is_better is None:
    greater_is_better = not bare.endswith("loss")
  return f"eval_{bare}", greater_is_better


def prepare_output_dir(config) -> pathlib.Path:
  """Creates output_dir; refuses to write a fresh training run over one that holds another."""
  output_dir = pathlib.Path(config.output_dir)
  if output_dir.exists() and not output_dir.is_dir():
    raise UserError(f"--output_dir {output_dir} is a file: choose a directory")
  if (config.do_train and not config.overwrite_output_dir and not config.resume_from_checkpoint
      and output_dir.is_dir() and any(output_dir.iterdir())
      and not checkpoints.saved_steps(output_dir)):
    raise UserError(f"--output_dir {output_dir} is not empty and holds no checkpoint to resume: "
                    "pass --overwrite_output_dir to write over it or choose another --output_dir")
  try:
    output_dir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"--output_dir {output_dir} cannot be created ({error.strerror or error}): "
                    "choose a directory you can write to") from error
  if not os.access(output_dir, os.W_OK | os.X_OK):
    raise UserError(f"--output_dir {output_dir} is not writable: choose a directory you can "
                    "write to")
  return output_dir


def checkpoints_to_resume(config, output_dir: pathlib.Path) -> list[pathlib.Path]:
  """--resume_from_checkpoint, else output_dir's checkpoints latest first unless it is being
  overwritten (Hugging Face's two ways to resume); empty for a fresh run."""
  if not config.do_train:
    return []
  if config.resume_from_checkpoint:
    return [checkpoints.find_step_dir(config.resume_from_checkpoint)]
  if config.overwrite_output_dir:
    return []
  directory = checkpoints.checkpoint_dir(output_dir)
  return [directory / str(step) for step in reversed(checkpoints.saved_steps(output_dir))]


def use_trained_model_in_output_dir(config, output_dir: pathlib.Path) -> None:
  """Eval/predict-only runs without --model_name_or_path use the model trained in output_dir."""
  if (not config.do_train and not config.model_name_or_path
      and all((output_dir / name).is_file() for name in MODEL_FILES)):
    log.info("Using the trained model in %s", output_dir)
    config.model_name_or_path = str(output_dir)


def resolve_precision(config) -> None:
  """Replaces dtype/param_dtype 'auto' by what suits the backend: bfloat16 compute and params
  (float32 master weights) on GPUs and TPUs, float32 on CPUs, whose bfloat16 is emulated or
  slower for everything but matmuls. Called after jax.distributed is set up."""
  on_accelerator = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
  if config.dtype == "auto":
    config.dtype = "bfloat16" if on_accelerator else "float32"
  if config.param_dtype == "auto":
    config.param_dtype = config.dtype if on_accelerator else "float32"
  log.info("Precision: %s compute, %s params", config.dtype, config.param_dtype)


def load_model(config, vocabulary_size: int):
  """(T5Config, params): pretrained weights or a random init of --config_name."""
  if config.model_name_or_path:
    log.info("Loading model %s", config.model_name_or_path)
    model_config, params = hf_checkpoint.load_pretrained(config.model_name_or_path,
                                                         cache_dir=config.cache_dir)
  elif config.config_name:
    model_config = T5Config.from_pretrained_json(config.config_name)
    if not config.do_train:
      log.warning("No trained model (no --model_name_or_path, none in --output_dir): "
                  "evaluating a random init of %s", config.config_name)
    params = init_params(model_config, jax.random.PRNGKey(config.seed))
  else:
    raise UserError("no model: pass --model_name_or_path (pretrained) or --config_name "
                    "(a T5 config.json to train from scratch)")
  if vocabulary_size > model_config.vocab_size:
    raise UserError(f"the tokenizer has {vocabulary_size} tokens but the model only "
                    f"{model_config.vocab_size}: pass a matching --tokenizer_name")
  return dataclasses.replace(model_config, dtype=config.dtype), params


def save_model(output_dir: pathlib.Path, model_config: T5Config, params, tokenizer,
               generation_settings: dict[str, Any]) -> None:
  """The final model in Hugging Face format; a write the disk refuses is one line (each file is
  written to a temporary name first, so none is left half-written)."""
  try:
    hf_checkpoint.save_pretrained(output_dir, dataclasses.replace(model_config, dtype="float32"),
                                  params, tokenizer, generation_settings)
  except Exception as error:  # safetensors reports a full disk as a SafetensorError.
    os_error = os_error_of(error)
    if os_error is None:
      raise
    last_step = (checkpoints.saved_steps(output_dir) or [None])[-1]
    raise disk_error(os_error, "writing the trained model", output_dir,
                     f"run the same command again to write it from the last checkpoint (step "
                     f"{last_step})") from error


def global_batch_size(config) -> int:
  return (config.per_device_train_batch_size * config.gradient_accumulation_steps
          * jax.device_count())


def check_global_batch(config, num_examples: int) -> None:
  """Refuses training data that does not fill one global batch."""
  global_batch = global_batch_size(config)
  if num_examples < global_batch:
    raise UserError(
        f"the training data has {num_examples} examples, fewer than one global batch of "
        f"{global_batch} (--per_device_train_batch_size {config.per_device_train_batch_size} x "
        f"{jax.device_count()} devices x --gradient_accumulation_steps "
        f"{config.gradient_accumulation_steps}): lower --per_device_train_batch_size or "
        "--gradient_accumulation_steps, or add training data")


def repeat_epochs(dataset, config, start_step: int,
                  steps_per_epoch: int) -> Iterator[dict[str, np.ndarray]]:
  """Train batches from `start_step` on; the position is index arithmetic, nothing is replayed."""
  epoch, start_batch = divmod(start_step, steps_per_epoch)
  while True:
    yield from input_pipeline.train_batches(
        dataset, seed=config.seed, epoch=epoch, start_batch=start_batch,
        per_device_batch_size=config.per_device_train_batch_size
        * config.gradient_accumulation_steps,
        num_devices=jax.local_device_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
        buckets=input_pipeline.length_buckets(config, "train"),
        grouped_by_length=config.group_by_length)
    epoch, start_batch = epoch + 1, 0


class Evaluator:
  """Loss (and, with predict_with_generate, ROUGE) over every example of a split, once each."""

  def __init__(self, config, tokenizer, p_eval_step, p_generate_step):
    self.config = config
    self.tokenizer = tokenizer
    self.p_eval_step = p_eval_step
    self.p_generate_step = p_generate_step

  def __call__(self, params, dataset, references: list[str], prefix: str):
    """Returns ({prefix_loss, ...}, predictions in dataset order or None)."""
    config = self.config
    buckets = input_pipeline.length_buckets(config, "validation")
    sums = None
    local_tokens, local_indices = [], []
    num_batches = input_pipeline.num_eval_batches(
        len(dataset), config.per_device_eval_batch_size * jax.device_count())
    for batch in reporting.progress_bar(input_pipeline.eval_batches(
        dataset, per_device_batch_size=config.per_device_eval_batch_size,
        num_devices=jax.local_device_count(), max_source_length=config.max_source_length,
        max_target_length=config.val_max_target_length,
        process_index=jax.process_index(), process_count=jax.process_count(), buckets=buckets),
        total=num_batches, desc=prefix, unit="batch", leave=False):
      sums = metrics_lib.accumulate(sums, first_replica(self.p_eval_step(params, batch)))
      if config.predict_with_generate:
        tokens = np.asarray(self.p_generate_step(params, batch))
        local_tokens.append(tokens.reshape(-1, tokens.shape[-1]))
        local_indices.append(batch["example_index"].reshape(-1))
    results = {f"{prefix}_{name}": value for name, value in metrics_lib.finalize(sums).items()}
    predictions = None
    if config.predict_with_generate:
      # Each process generated its slice of every batch: one gather gives every process all
      # rows, so all compute the same ROUGE (and agree on the best checkpoint).
      tokens, indices = distributed.gather_rows((np.concatenate(local_tokens),
                                                 np.concatenate(local_indices)))
      generated = [None] * len(dataset)
      for row, index in zip(tokens, indices):
        if index >= 0:
          generated[index] = row
      predictions = [text.strip().replace("\n", " ") for text in
                     self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
      rouge = metrics_lib.compute_rouge(predictions, references)
      results.update({f"{prefix}_{name}": value for name, value in rouge.items()})
      results[f"{prefix}_gen_len"] = metrics_lib.mean_generation_length(generated)
    results[f"{prefix}_samples"] = len(dataset)
    return results, predictions


class TrainLog:
  """`train_log.jsonl` and the console (and, through `monitor`, TensorBoard and the progress
  bar): one record per logging step or evaluation."""

  def __init__(self, path: pathlib.Path, append: bool,
               monitor: reporting.TrainMonitor | None = None):
    self.file = path.open("a" if append else "w") if distributed.is_main_process() else None
    self.monitor = monitor

  def write(self, record: dict[str, Any]) -> None:
    if self.file is not None:
      self.file.write(json.dumps(record) + "\n")
      self.file.flush()
    if self.monitor is not None:
      self.monitor.write(record)
    log.info("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in record.items()))

  def close(self):
    if self.file is not None:
      self.file.close()


def restore_progress(candidates: list[pathlib.Path], state, expected: dict[str, Any]):
  """(state, progress, step_dir) of the first candidate checkpoint that can be read; one that
  cannot is skipped with a warning while an earlier one is left. Refuses a checkpoint that
  cannot resume exactly (other batch layout, data, schedule or seed)."""
  for index, step_dir in enumerate(candidates):
    try:
      restored, progress = checkpoints.restore_training(step_dir, state)
    except Exception as error:  # Orbax, JSON and file errors of a partial or corrupt checkpoint.
      first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
      if index + 1 < len(candidates):
        log.warning("Skipping checkpoint %s, which cannot be read (%s); trying %s", step_dir,
                    first_line, candidates[index + 1])
        continue
      if isinstance(error, UserError):
        raise
      raise UserError(f"checkpoint {step_dir} cannot be restored into this model and optimizer "
                      f"({first_line}): resume with the settings it was trained with or pass "
                      "--overwrite_output_dir to start fresh") from error
    for key, value in expected.items():
      if progress.get(key) != value:
        raise UserError(f"checkpoint {step_dir} was trained with {key} {progress.get(key)}, "
                        f"this run has {value}: resume with the same settings (global batch = "
                        "per_device_train_batch_size x devices x gradient_accumulation_steps) "
                        "or pass --overwrite_output_dir to start fresh")
    return restored, progress, step_dir
  raise AssertionError("restore_progress needs at least one candidate")


@dataclasses.dataclass(frozen=True)
class BestCheckpoint:
  step_dir: pathlib.Path
  metric: float


def better_checkpoint(best: BestCheckpoint | None, step_dir: pathlib.Path,
                      eval_metrics: dict[str, Any], metric_key: str,
                      greater_is_better: bool) -> BestCheckpoint | None:
  """`best`, or the checkpoint at `step_dir` if its metric beats it; on a tie the earlier one
  stays best, as in Hugging Face."""
  value = eval_metrics.get(metric_key)
  if value is None or not math.isfinite(value):
    return best
  if best is None or (value > best.metric if greater_is_better else value < best.metric):
    return BestCheckpoint(step_dir, float(value))
  return best


def best_of_recorded(directory: pathlib.Path, up_to_step: int, metric_key: str,
                     greater_is_better: bool) -> BestCheckpoint | None:
  """The best checkpoint so far, from the eval metrics recorded in the checkpoints of a resumed
  run; retention never deletes it, so it is the one the uninterrupted run had."""
  best = None
  for step_dir, eval_metrics in checkpoints.recorded_eval_metrics(directory, up_to_step):
    best = better_checkpoint(best, step_dir, eval_metrics, metric_key, greater_is_better)
  return best


class StopSignals:
  """Records SIGTERM/SIGINT (preemption, Ctrl-C) so the loop can stop after the current step."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._record)
    return self

  def _record(self, signum, frame):
    del frame
    self.received = signum

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def train(config, model, params, train_dataset, output_dir: pathlib.Path, evaluate_fn,
          resume_candidates: list[pathlib.Path]):
  """The step loop, fresh or resumed from the first readable of `resume_candidates`.

  Returns (params, train_results): the last step's params, or with --load_best_model_at_end the
  best evaluated checkpoint's. Raises RunStopped after saving a checkpoint when SIGTERM or
  SIGINT arrives, and without saving when the loss stops being finite.
  """
  global_batch = global_batch_size(config)  # train_and_evaluate checked the data fills one.
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_dataset), global_batch)
  total_steps = (config.max_steps if config.max_steps > 0
                 else math.ceil(config.num_train_epochs * steps_per_epoch))
  # What an exact resume needs to be the same: the data order, the schedule, the dropout keys.
  layout = {"global_batch_size": global_batch, "train_samples": len(train_dataset),
            "total_steps": total_steps, "seed": config.seed,
            "group_by_length": config.group_by_length}

  learning_rate_fn = optim.create_learning_rate_schedule(config, total_steps)
  state = steps.TrainState.create(apply_fn=model.apply, params=params,
                                  tx=optim.create_optimizer(config, learning_rate_fn),
                                  param_dtype=config.param_dtype)
  start_step, run_sums = 0, None
  # Hugging Face tracks the best checkpoint whenever a metric for it is set.
  tracks_best = config.metric_for_best_model is not None
  best: BestCheckpoint | None = None
  if resume_candidates:
    state, progress, resume_from = restore_progress(resume_candidates, state, layout)
    start_step = progress["step"]
    run_sums = progress["train_sums"]
    log.info("Resuming from checkpoint %s at step %d", resume_from, start_step)
    if tracks_best:
      best = best_of_recorded(resume_from.parent, start_step, config.metric_for_best_model,
                              config.greater_is_better)
      if best is not None:
        log.info("Best checkpoint so far: %s (%s %.6g)", best.step_dir,
                 config.metric_for_best_model, best.metric)
    # Every process has read its checkpoint before process 0 renames the later ones.
    distributed.barrier("checkpoint restored")
    if distributed.is_main_process():
      for stale in checkpoints.set_aside_after(output_dir, start_step):
        log.warning("Set aside checkpoint %s, which is after the resumed step", stale)
  elif distributed.is_main_process():
    checkpoints.remove_all(output_dir)
  # Each process's checkpoint manager must find the directory as process 0 left it.
  distributed.barrier("checkpoint directory ready")
  log.info("Training steps %d to %d (%.2f epochs of %d examples), global batch %d on %d devices",
           start_step + 1, total_steps, total_steps / steps_per_epoch, len(train_dataset),
           global_batch, jax.device_count())
  state = steps.replicate(state)
  p_train_step = steps.pmap_train_step(learning_rate_fn, config)
  dropout_rng = jax.random.PRNGKey(config.seed + 1)
  manager = checkpoints.create_manager(output_dir)
  monitor = reporting.TrainMonitor(output_dir, run_config=cli.config_to_dict(config),
                                   start_step=start_step, total_steps=total_steps,
                                   resumed=bool(resume_candidates))
  train_log = TrainLog(output_dir / "train_log.jsonl", append=bool(resume_candidates),
                       monitor=monitor)

  # Made on a background thread, then put on the devices two steps ahead, so a step never
  # waits for its batch; the host copies stay for the throughput counts.
  host_batches: collections.deque = collections.deque()

  def kept_on_host(batches):
    for batch in batches:
      host_batches.append(batch)
      yield batch

  batches = jax_utils.prefetch_to_device(
      kept_on_host(input_pipeline.in_background(
          repeat_epochs(train_dataset, config, start_step, steps_per_epoch))),
      size=2, axis_name=steps.AXIS)
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  interval_sums = last_metrics = None
  peak_flops, peak_source = perf.peak_flops_per_device()
  log.info("MFU is measured against %.4g FLOP/s per device (%s)", peak_flops, peak_source)
  throughput = perf.Throughput(model.config, peak_flops * jax.device_count(),
                               jax.process_count())
  train_start = time.time()

  def flush_pending():
    """Brings the pending step metrics to the host: the loop's only synchronisation."""
    nonlocal pending, interval_sums, run_sums, last_metrics
    for step, metrics in pending:
      metrics = first_replica(metrics)
      if not np.isfinite(metrics["loss"]):
        wait_for_save()
        raise RunStopped(
            f"the training loss is not finite at step {step}; the checkpoints before it are "
            f"kept in {checkpoints.checkpoint_dir(output_dir)}: lower --learning_rate or use "
            "--dtype float32, then resume with --resume_from_checkpoint", exit_code=1)
      sums = {"loss": metrics["loss"], "denominator": metrics["denominator"]}
      interval_sums = metrics_lib.accumulate(interval_sums, sums)
      run_sums = metrics_lib.accumulate(run_sums, sums)
      last_metrics = metrics
    pending = []

  saving_step: int | None = None  # The step of the save in flight, if any.

  def wait_for_save():
    """Ends the save in flight; one the disk refuses becomes a one-line error naming it."""
    nonlocal saving_step
    if saving_step is None:
      return
    with checkpoints.explaining_save_errors(saving_step, output_dir, config):
      manager.wait_until_finished()
    saving_step = None

  def finish_saves():
    """Waits for the save in flight, then applies --save_total_limit to the complete ones."""
    wait_for_save()
    if not distributed.is_main_process():
      return
    best_step = (int(best.step_dir.name) if best is not None
                 and best.step_dir.parent == checkpoints.checkpoint_dir(output_dir) else None)
    for deleted in checkpoints.apply_save_total_limit(output_dir, config.save_total_limit,
                                                      best_step):
      log.info("Deleted checkpoint %s (--save_total_limit %d)", deleted,
               config.save_total_limit)

  def save(step, eval_metrics=None):
    """`eval_metrics` are recorded only for the regular saves, the best-model candidates: a
    checkpoint saved on a signal is not one in an uninterrupted run either."""
    nonlocal best, saving_step
    flush_pending()
    finish_saves()
    progress = {"step": step, "train_sums": run_sums, **layout}
    if eval_metrics is not None:
      progress["eval_metrics"] = eval_metrics
    saving_step = step
    with checkpoints.explaining_save_errors(step, output_dir, config):
      checkpoints.save(manager, step, first_replica(state), model.config, progress)
    if tracks_best and eval_metrics is not None:
      best = better_checkpoint(best, checkpoints.checkpoint_dir(output_dir) / str(step),
                               eval_metrics, config.metric_for_best_model,
                               config.greater_is_better)

  stop_vote = distributed.StopVote()
  with StopSignals() as stop_signals, monitor:
    for step in monitor.steps():
      batch = next(batches)
      throughput.add(host_batches.popleft())
      state, step_metrics = p_train_step(state, batch, dropout_rng)
      pending.append((step, step_metrics))
      is_last = step == total_steps
      if step % config.logging_steps == 0 or is_last:
        flush_pending()
        train_log.write({"step": step, "loss": metrics_lib.finalize(interval_sums)["loss"],
                         "learning_rate": float(last_metrics["learning_rate"]),
                         "grad_norm": float(last_metrics["grad_norm"]),
                         **throughput.report(),
                         "epoch": round(step / steps_per_epoch, 4)})
        interval_sums = None
      eval_metrics = None
      # The last step's evaluation is left to do_eval, unless the last checkpoint competes for
      # the best.
      if (config.eval_steps and step % config.eval_steps == 0
          and (not is_last or tracks_best)):
        if evaluate_fn is not None:
          throughput.pause()
          eval_metrics = evaluate_fn(state.params)
          train_log.write({"step": step, **eval_metrics})
          throughput.resume()
      stop_signal = stop_vote(stop_signals.received)
      if (config.save_steps and step % config.save_steps == 0) or is_last:
        save(step, eval_metrics)
      elif stop_signal is not None:
        save(step)
      if stop_signal is not None and not is_last:
        finish_saves()
        name = signal.Signals(stop_signal).name
        raise RunStopped(f"stopped by {name} after step {step} of {total_steps}; checkpoint "
                         f"saved in {checkpoints.checkpoint_dir(output_dir) / str(step)}: run "
                         "the same command again to resume", exit_code=128 + stop_signal)
  steps_run = total_steps - start_step
  train_runtime = time.time() - train_start
  finish_saves()
  manager.close()
  train_log.close()

  run_rates = throughput.summary()
  train_results = {
      "train_loss": metrics_lib.finalize(run_sums)["loss"],
      "train_runtime": round(train_runtime, 4),
      "train_samples": len(train_dataset),
      "train_samples_per_second": round(steps_run * global_batch / train_runtime, 3),
      "train_steps_per_second": round(steps_run / train_runtime, 3),
      "epoch": round(total_steps / steps_per_epoch, 4),
      # Over the train steps alone (evaluation left out); padding tokens are not counted.
      "train_tokens_per_second": run_rates["tokens_per_second"],
      "train_mfu": run_rates["mfu"],
  }
  if tracks_best:
    train_results["best_model_checkpoint"] = str(best.step_dir) if best is not None else None
    train_results["best_metric"] = best.metric if best is not None else None
  if not config.load_best_model_at_end:
    return first_replica(state.float32_params()), train_results
  if best is None:
    log.warning("--load_best_model_at_end: no checkpoint was evaluated (every %d steps, %d steps "
                "in all), so the final model is the last step's", config.eval_steps, total_steps)
    return first_replica(state.float32_params()), train_results
  log.info("Best checkpoint: step %s (%s %.6g); its params are the final model",
           best.step_dir.name, config.metric_for_best_model, best.metric)
  _, best_params = checkpoints.load_params(best.step_dir)
  return best_params, train_results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None):
  """Runs the modes the config turns on and writes every result into output_dir."""
  if workdir is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.output_dir = workdir
  distributed.initialize(config)  # Before any other JAX call.
  config = prepare_config(config)
  output_dir = prepare_output_dir(config)
  resume_candidates = checkpoints_to_resume(config, output_dir)
  # Every process has checked output_dir before process 0 writes into it.
  distributed.barrier("output_dir checked")
  is_main = distributed.is_main_process()
  # Checked before any work, so a missing login does not surface after hours of training.
  hub_target = hub.check_hub_access(config) if config.push_to_hub else None
  log.info("JAX %s on %d %s device(s) in %d process(es); output_dir %s", jax.__version__,
           jax.device_count(), jax.default_backend(), jax.process_count(), output_dir)

  use_trained_model_in_output_dir(config, output_dir)
  tokenizer = input_pipeline.load_tokenizer(config)
  # Before loading: its bars on stderr would precede a one-line error about the data.
  reporting.quiet_datasets_bars()
  raw_datasets = input_pipeline.load_raw_datasets(config)
  tokenized = input_pipeline.tokenize_datasets(raw_datasets, tokenizer, config)
  # Padded once; every epoch and every evaluation slices these arrays.
  datasets = {split: input_pipeline.to_arrays(
      dataset, max_source_length=config.max_source_length,
      max_target_length=input_pipeline.target_length(config, split))
              for split, dataset in tokenized.items()}
  if config.do_train:
    # Before anything is written, so that the corrected command can simply be run again.
    check_global_batch(config, len(datasets["train"]))
  resolve_precision(config)
  model_config, params = load_model(config, len(tokenizer))
  model = T5(model_config)
  if config.do_train and is_main:
    write_json(output_dir / "run_config.json", cli.config_to_dict(config))

  model_dir = (hf_checkpoint.resolve_model_dir(config.model_name_or_path, config.cache_dir)
               if config.model_name_or_path else None)
  generation_settings = decode.resolve(config, model_config,
                                       decode.read_generation_config(model_dir))
  if config.predict_with_generate:
    log.info("Generation settings: %s", generation_settings)
  p_eval_step, p_generate_step = steps.pmap_eval_steps(model, generation_settings)
  evaluator = Evaluator(config, tokenizer, p_eval_step, p_generate_step)
  validation_references = (input_pipeline.references(raw_datasets["validation"], config)
                           if "validation" in raw_datasets else None)

  def evaluate_validation(replicated_params):
    results, _ = evaluator(replicated_params, datasets["validation"], validation_references,
                           "eval")
    return results

  # Like the HF Trainer, eval/predict-only runs add to the results of the run they evaluate.
  all_results_path = output_dir / "all_results.json"
  all_results: dict[str, Any] = {}
  if not config.do_train and all_results_path.is_file():
    all_results = json.loads(all_results_path.read_text())
  if config.do_train:
    params, train_results = train(config, model, params, datasets["train"], output_dir,
                                  evaluate_validation if config.do_eval else None,
                                  resume_candidates)
    if is_main:
      save_model(output_dir, model_config, params, tokenizer, generation_settings.to_hf_dict())
      write_json(output_dir / "train_results.json", train_results)
      log.info("Saved the model to %s", output_dir)
    all_results.update(train_results)

  replicated_params = steps.replicate(params)
  if config.do_eval:
    eval_results = evaluate_validation(replicated_params)
    if is_main:
      write_json(output_dir / "eval_results.json", eval_results)
    all_results.update(eval_results)
    log.info("eval: %s", json.dumps(eval_results))
  if config.do_train:
    reporting.finish_training(output_dir, all_results)
  if config.do_predict:
    predict_results, predictions = evaluator(
        replicated_params, datasets["test"],
        input_pipeline.references(raw_datasets["test"], config), "predict")
    all_results.update(predict_results)
    if is_main:
      write_json(output_dir / "predict_results.json", predict_results)
      if predictions is not None:
        (output_dir / "generated_predictions.txt").write_text("\n".join(predictions) + "\n")
    log.info("predict: %s", json.dumps(predict_results))
  if is_main:
    write_json(all_results_path, all_results)
  if hub_target is not None and is_main:
    hub.write_model_card(output_dir, cli.config_to_dict(config), all_results,
                         repo_id=hub_target.repo_id)
    log.info("Pushed to the Hub: %s", hub.push_to_hub(hub_target, output_dir))
  # The others wait for process 0's writes and upload, so no process exits before the run is
  # complete.
  distributed.barrier("outputs written")
  return all_results


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stdout, force=True)
  for noisy in ("absl", "jax", "orbax", "datasets", "transformers", "urllib3", "httpx"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  debug = cli.asks_for_debug(argv)
  cli.quiet_library_tracebacks(debug)
  if not debug:
    checkpoints.quiet_closed_event_loop_reports()
  try:
    config = cli.parse_args(argv)
    if distributed.initialize(config) and not distributed.is_main_process():
      logging.getLogger().setLevel(logging.WARNING)
    train_and_evaluate(config)
  except UserError as error:
    cli.print_error("error", error, argv)
    return 2
  except RunStopped as stopped:
    cli.print_error("stopped", stopped, argv)
    return stopped.exit_code
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
      raise
    cli.print_error("error", UserError(
        f"the devices ran out of memory ({str(error).strip().splitlines()[0][:160]}): lower "
        "--per_device_train_batch_size or --per_device_eval_batch_size (raise "
        "--gradient_accumulation_steps to keep the global batch), shorten --max_source_length, "
        "or use --bf16; the checkpoints saved so far are kept"), argv)
    return 2
  except OSError as error:
    # Checkpoints and the model are handled where they are written; this is any other file.
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    cli.print_error("error", UserError(
        f"{os.strerror(error.errno).lower()} while writing "
        f"{error.filename or 'the outputs'}: free disk space, then run the same command again; "
        "the checkpoints saved so far are kept"), argv)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
