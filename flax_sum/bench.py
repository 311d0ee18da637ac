"""Benchmarks flax-sum against transformers' PyTorch T5 on this machine, side by side.

  python -m flax_sum.bench [--parts train,generate,padding] [--train_steps 8] ...

Every part runs a randomly initialised t5-small-shaped model on real text (the bundled
DialogSum) in this process, in rounds that run each side once, in turn (--repeats rounds; a
side's rate is its best round); the report (one JSON object on stdout) gives their ratios. Rates
are steady state: the warm-up calls that compile are timed apart. The PyTorch sides need torch
and are left out without it.

- train: samples/s of our pmapped train step (one device, length buckets) vs a PyTorch loop that
  trains the way `run_summarization.py` does (dynamic padding to the longest row of each batch,
  AdamW, a linear schedule, gradient clipping), and our model FLOP/s as a fraction of the
  device's peak (on a CPU: its measured float32 matmul rate).
- generate: summaries/s of our beam search vs PyTorch `generate` with the same settings, and
  whether the tokens are identical.
- padding: our training with length buckets vs padding every batch to the max lengths, on
  long-tailed lengths (DialogSum under max_source_length 1024).

The train and generate parts also time `matmuls_only`: the model's matmuls alone at the same
shapes (`perf.matmuls_only_train_step`, `perf.matmuls_only_generate`), the floor of any
implementation built from XLA's matmuls on this device.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import tempfile
import time
from typing import Any, Callable

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from flax_sum import config as config_lib
from flax_sum import decode
from flax_sum import hf_checkpoint
from flax_sum import input_pipeline
from flax_sum import optim
from flax_sum import perf
from flax_sum import steps
from flax_sum.model import T5, T5Config, init_params

PARTS = ("train", "generate", "padding")


def _interleaved_best_times(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Each side's best wall time over `repeats` rounds that call every side once, in turn: a
  slow spell of a shared machine then slows both sides' rounds, not one side's whole run.
  Call each side once before, to compile or warm up."""
  best = {name: float("inf") for name in sides}
  for _ in range(repeats):
    for name, side in sides.items():
      best[name] = min(best[name], _timed(side))
  return best


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _real_text(split: str, count: int, source_length: int,
               target_length: int) -> input_pipeline.TokenArrays:
  """The first `count` DialogSum examples of a split, tokenized as training does."""
  tokenizer = input_pipeline.load_tokenizer(config_lib.base_config())  # The bundled T5 one.
  with open(config_lib.BUNDLED_DIALOGSUM_DIR / f"{split}.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for _, line in zip(range(count), f)]
  tokenized = datasets.Dataset.from_dict(input_pipeline.tokenize_batch(
      [row["dialogue"] for row in rows], [row["summary"] for row in rows],
      list(range(len(rows))), tokenizer=tokenizer, source_prefix="summarize: ",
      max_source_length=source_length, max_target_length=target_length),
      features=input_pipeline.TOKENIZED_FEATURES)
  return input_pipeline.to_arrays(tokenized, max_source_length=source_length,
                                  max_target_length=target_length)


def _machine() -> dict[str, Any]:
  device = jax.local_devices()[0]
  info = {"platform": device.platform, "device_kind": device.device_kind,
          "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "transformers": transformers.__version__}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      info["cpu"] = names[0]
  except OSError:
    pass
  return info


def _torch():
  try:
    import torch
  except ImportError:
    return None
  return torch


def _torch_model(model_config: T5Config, params: Any):
  with tempfile.TemporaryDirectory() as model_dir:
    hf_checkpoint.save_pretrained(model_dir, model_config, jax.device_get(params))
    return transformers.T5ForConditionalGeneration.from_pretrained(model_dir)


def _flax_trainer(model_config: T5Config, params: Any,
                  batches: list[dict[str, np.ndarray]]) -> tuple[Callable[[], None], float]:
  """A function that runs our train step over `batches` (each call goes on training the same
  state) in the model's compute dtype with float32 params, and the seconds of the warm-up that
  compiled one program per batch shape first."""
  config = config_lib.base_config()
  config.learning_rate = 5e-5
  schedule = optim.create_learning_rate_schedule(config, 2 * len(batches))
  state = steps.TrainState.create(apply_fn=T5(model_config).apply, params=params,
                                  tx=optim.create_optimizer(config, schedule))
  device = jax.local_devices()[:1]
  state = steps.replicate(state, devices=device)
  p_train_step = steps.pmap_train_step(schedule, config)
  dropout_rng = jax.random.PRNGKey(0)

  def run(selected):
    nonlocal state
    for batch in selected:
      state, metrics = p_train_step(state, batch, dropout_rng)
    jax.block_until_ready(metrics)

  shapes = {(b["input_ids"].shape, b["labels"].shape): b for b in batches}
  warmup_seconds = _timed(lambda: run(list(shapes.values())))
  return lambda: run(batches), warmup_seconds


def _matmuls_only_trainer(model_config: T5Config,
                          batches: list[dict[str, np.ndarray]]) -> Callable[[], None]:
  """A function that runs, for each of `batches`, the loss and gradient of a network made only
  of the train step's matmuls at its shape (`perf.matmuls_only_train_step`), compiled first."""
  def shape(batch):  # (batch size, source length, target length)
    return (*batch["input_ids"].shape[-2:], batch["labels"].shape[-1])

  programs = {}
  for batch in batches:
    if shape(batch) not in programs:
      programs[shape(batch)] = perf.matmuls_only_train_step(model_config, *shape(batch))
      programs[shape(batch)].run()
  return lambda: [programs[shape(batch)].run() for batch in batches]


def _torch_trainer(torch, model_config: T5Config, params: Any,
                   batches: list[dict[str, np.ndarray]]) -> tuple[Callable[[], None], list[float]]:
  """A function that trains transformers' PyTorch T5 over `batches` the way
  run_summarization.py does (after one warm-up step), and its batches' mean padded widths.
  With a bfloat16 `model_config.dtype` it runs under bfloat16 autocast, as the Trainer's
  --bf16 does on CPUs."""
  torch.manual_seed(0)
  torch_model = _torch_model(model_config, params).train()
  optimizer = torch.optim.AdamW(torch_model.parameters(), lr=5e-5, weight_decay=0.0)
  torch_schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: max(0.0, 1 - step / (2 * len(batches))))
  # run_summarization's collator pads each batch to its longest row (labels with -100).
  torch_batches = []
  for batch in batches:
    mask, target_mask = batch["attention_mask"][0], batch["decoder_attention_mask"][0]
    source, target = int(mask.sum(1).max()), int(target_mask.sum(1).max())
    labels = np.where(target_mask, batch["labels"][0], -100)[:, :target]
    torch_batches.append({"input_ids": torch.tensor(batch["input_ids"][0][:, :source]).long(),
                          "attention_mask": torch.tensor(mask[:, :source]).long(),
                          "labels": torch.tensor(labels).long()})

  autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                            enabled=model_config.dtype == jnp.bfloat16)

  def run(selected):
    for batch in selected:
      with autocast:
        loss = torch_model(**batch).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
      optimizer.step()
      torch_schedule.step()
      optimizer.zero_grad()

  run(torch_batches[:1])
  return lambda: run(torch_batches), _mean_widths(torch_batches)


def _flax_batches(arrays: input_pipeline.TokenArrays, batch_size: int,
                  buckets: input_pipeline.LengthBuckets | None) -> list[dict[str, np.ndarray]]:
  return list(input_pipeline.train_batches(arrays, seed=0, epoch=0,
                                           per_device_batch_size=batch_size, num_devices=1,
                                           buckets=buckets))


def _mean_widths(batches: list[dict[str, Any]]) -> list[float]:
  return [round(float(np.mean([b[key].shape[-1] for b in batches])), 1)
          for key in ("input_ids", "labels")]


def bench_train(model_config: T5Config, params: Any, args: argparse.Namespace) -> dict[str, Any]:
  batch_size, num_steps = args.train_batch_size, args.train_steps
  model_config = dataclasses.replace(model_config, dtype=jnp.dtype(args.train_dtype))
  arrays = _real_text("train", batch_size * num_steps, args.source_length, args.target_length)
  buckets = input_pipeline.LengthBuckets.evenly_spaced(args.source_length, args.target_length,
                                                       args.length_buckets)
  batches = _flax_batches(arrays, batch_size, buckets)
  train_ours, warmup_s = _flax_trainer(model_config, params, batches)
  sides = {"flax_sum": train_ours, "matmuls_only": _matmuls_only_trainer(model_config, batches)}
  torch = None if args.skip_torch else _torch()
  if torch is not None:
    sides["transformers"], torch_widths = _torch_trainer(
        torch, model_config, params, _flax_batches(arrays, batch_size, None))
  seconds = _interleaved_best_times(sides, args.repeats)
  ours_s = seconds["flax_sum"]
  step_flops = sum(batch_size * perf.train_flops_per_example(
      model_config, b["input_ids"].shape[-1], b["labels"].shape[-1]) for b in batches)
  peak, peak_source = perf.peak_flops_per_device()
  result = {
      "dtype": args.train_dtype, "batch_size": batch_size, "max_source_length": args.source_length,
      "max_target_length": args.target_length, "steps": num_steps,
      "flax_sum_samples_per_second": round(num_steps * batch_size / ours_s, 3),
      "flax_sum_compile_seconds": round(warmup_s, 2),
      "flax_sum_mean_padded_lengths": _mean_widths(batches),
      "model_flops_per_second": round(step_flops / ours_s / 1e9, 2) * 1e9,
      "peak_flops_per_second": round(peak / 1e9, 2) * 1e9, "peak_source": peak_source,
      "mfu": round(step_flops / ours_s / peak, 3) if peak else None,
      "matmuls_only_samples_per_second": round(num_steps * batch_size / seconds["matmuls_only"],
                                               3),
      "matmuls_only_mfu": round(step_flops / seconds["matmuls_only"] / peak, 3) if peak else None,
  }
  if torch is not None:
    theirs_s = seconds["transformers"]
    result["transformers_samples_per_second"] = round(num_steps * batch_size / theirs_s, 3)
    result["speedup"] = round(theirs_s / ours_s, 2)
    result["matmuls_only_speedup"] = round(theirs_s / seconds["matmuls_only"], 2)
    result["transformers_mean_padded_lengths"] = torch_widths
    result["torch_threads"] = torch.get_num_threads()
  return result


def bench_padding(model_config: T5Config, params: Any,
                  args: argparse.Namespace) -> dict[str, Any]:
  """Length buckets vs padding to the max on long-tailed lengths: DialogSum's dialogues under
  HF's default max_source_length 1024 tokens (their median is about 200)."""
  batch_size, num_steps = args.train_batch_size, args.train_steps
  source_length, target_length = args.padding_source_length, args.padding_target_length
  arrays = _real_text("train", batch_size * num_steps, source_length, target_length)
  result = {"batch_size": batch_size, "max_source_length": source_length,
            "max_target_length": target_length, "steps": num_steps}
  sides = {}
  for name, buckets in (("pad_to_max", None), ("length_buckets", (
      input_pipeline.LengthBuckets.evenly_spaced(source_length, target_length,
                                                 args.length_buckets)))):
    batches = _flax_batches(arrays, batch_size, buckets)
    sides[name], warmup_s = _flax_trainer(model_config, params, batches)
    result[f"{name}_compile_seconds"] = round(warmup_s, 2)
    result[f"{name}_mean_padded_lengths"] = _mean_widths(batches)
  seconds = _interleaved_best_times(sides, args.repeats)
  for name, side_seconds in seconds.items():
    result[f"{name}_samples_per_second"] = round(num_steps * batch_size / side_seconds, 3)
  result["speedup"] = round(seconds["pad_to_max"] / seconds["length_buckets"], 2)
  return result


def bench_generate(model_config: T5Config, params: Any,
                   args: argparse.Namespace) -> dict[str, Any]:
  arrays = _real_text("validation", args.generate_batch_size, args.source_length,
                      args.target_length)
  batch = next(input_pipeline.eval_batches(arrays, per_device_batch_size=args.generate_batch_size,
                                           num_devices=1))
  input_ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
  # t5-small's summarization settings, with no EOS before max_new_tokens from a random model,
  # so both sides decode every step.
  settings = decode.GenerationSettings(
      max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, min_length=0,
      length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=3)
  tokens, sides = {}, {}
  result = {"batch_size": args.generate_batch_size, "source_length": args.source_length,
            "settings": dataclasses.asdict(settings)}
  # float32 as PyTorch runs; bfloat16 (params and compute) as an option where matmuls gain.
  for dtype, name in ((jnp.float32, "flax_sum"), (jnp.bfloat16, "flax_sum_bfloat16")):
    model = T5(dataclasses.replace(model_config, dtype=dtype))
    cast_params = jax.tree.map(lambda x: x.astype(dtype), params)
    generate = jax.jit(lambda p, i, m, model=model: decode.generate(model, p, i, m, settings))

    def run_ours(name=name, generate=generate, cast_params=cast_params):
      tokens[name] = np.asarray(generate(cast_params, input_ids, mask))

    result[f"{name}_first_call_seconds"] = round(_timed(run_ours), 2)
    sides[name] = run_ours
  matmuls_only = perf.matmuls_only_generate(model_config, args.generate_batch_size,
                                            input_ids.shape[-1], settings.num_beams,
                                            settings.max_new_tokens)
  matmuls_only.run()
  sides["matmuls_only"] = matmuls_only.run
  torch = None if args.skip_torch else _torch()
  if torch is not None:
    torch_model = _torch_model(model_config, params).eval()
    torch_inputs = {"input_ids": torch.tensor(np.asarray(input_ids)).long(),
                    "attention_mask": torch.tensor(np.asarray(mask)).long()}

    # float32 as run_summarization runs; bfloat16 weights and compute, as
    # `model.to(torch.bfloat16)` runs them.
    torch_models = {"transformers": torch_model,
                    "transformers_bfloat16": copy.deepcopy(torch_model).to(torch.bfloat16)}
    for name, side_model in torch_models.items():

      def run_theirs(name=name, side_model=side_model):
        with torch.no_grad():
          tokens[name] = side_model.generate(
              **torch_inputs, do_sample=False, num_beams=settings.num_beams,
              max_length=settings.max_new_tokens + 1, min_length=0,
              length_penalty=settings.length_penalty, early_stopping=True,
              no_repeat_ngram_size=settings.no_repeat_ngram_size).numpy()[:, 1:]

      run_theirs()
      sides[name] = run_theirs
  seconds = _interleaved_best_times(sides, args.repeats)
  for name in ("flax_sum", "flax_sum_bfloat16", "matmuls_only"):
    result[f"{name}_summaries_per_second"] = round(args.generate_batch_size / seconds[name], 3)
  if torch is None:
    return result
  for name in ("transformers", "transformers_bfloat16"):
    result[f"{name}_summaries_per_second"] = round(args.generate_batch_size / seconds[name], 3)
  result["speedup"] = round(seconds["transformers"] / seconds["flax_sum"], 2)
  result["matmuls_only_speedup"] = round(seconds["transformers"] / seconds["matmuls_only"], 2)
  result["speedup_bfloat16"] = round(
      seconds["transformers_bfloat16"] / seconds["flax_sum_bfloat16"], 2)
  result["speedup_bfloat16_vs_transformers_float32"] = round(
      seconds["transformers"] / seconds["flax_sum_bfloat16"], 2)
  width = min(tokens["transformers"].shape[1], tokens["flax_sum"].shape[1])
  result["same_tokens"] = bool(
      (tokens["transformers"][:, :width] == tokens["flax_sum"][:, :width]).all())
  result["bfloat16_same_tokens_fraction"] = round(float(
      (tokens["transformers"][:, :width] == tokens["flax_sum_bfloat16"][:, :width]).mean()), 3)
  return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m flax_sum.bench",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated parts to run (default: {','.join(PARTS)})")
  parser.add_argument("--model_config", default=str(config_lib.ASSETS_DIR / "t5" /
                                                    "t5-small-config.json"),
                      help="a Hugging Face T5 config.json (default: t5-small's)")
  parser.add_argument("--source_length", type=int, default=256)
  parser.add_argument("--target_length", type=int, default=64)
  parser.add_argument("--train_batch_size", type=int, default=8)
  parser.add_argument("--train_steps", type=int, default=8,
                      help="timed steps, after one warm-up step per batch shape")
  parser.add_argument("--train_dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the train part's compute dtype on both sides (params stay float32; "
                           "PyTorch then runs under bfloat16 autocast, as the Trainer's --bf16)")
  parser.add_argument("--length_buckets", type=int, default=4)
  parser.add_argument("--padding_source_length", type=int, default=1024)
  parser.add_argument("--padding_target_length", type=int, default=128)
  parser.add_argument("--generate_batch_size", type=int, default=8)
  parser.add_argument("--num_beams", type=int, default=4)
  parser.add_argument("--max_new_tokens", type=int, default=48)
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed rounds per part; each round runs every side once, in turn, "
                           "and a side's rate is its best round")
  parser.add_argument("--skip_torch", action="store_true", help="time flax-sum only")
  args = parser.parse_args(argv)
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown:
    parser.error(f"unknown part {sorted(unknown)[0]!r}: choose from {', '.join(PARTS)}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  model_config = T5Config.from_pretrained_json(args.model_config)
  params = init_params(model_config, jax.random.key(0))
  report: dict[str, Any] = {"machine": _machine()}
  torch = _torch()
  report["machine"]["torch"] = torch.__version__ if torch is not None else None
  parts = args.parts.split(",")
  if "train" in parts:
    report["train"] = bench_train(model_config, params, args)
  if "generate" in parts:
    report["generate"] = bench_generate(model_config, params, args)
  if "padding" in parts:
    report["padding"] = bench_padding(model_config, params, args)
  print(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
