"""Summaries/second of our jitted beam search vs transformers' PyTorch `generate`, same CPU.

Both run the same random t5-small-shaped model with the same settings, one after the other in
this process; prints one JSON object. The torch part is skipped when torch is not installed.

  python benchmarks/generate_bench.py [--batch_size 8] [--source_length 256] [--max_new_tokens 48]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import jax
import numpy as np

from flax_sum import config as config_lib
from flax_sum import decode
from flax_sum import hf_checkpoint
from flax_sum.model import T5, T5Config, init_params


def _time(fn, repeats: int) -> float:
  """Best wall time of `repeats` calls (after one warm-up call)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--source_length", type=int, default=256)
  parser.add_argument("--max_new_tokens", type=int, default=48)
  parser.add_argument("--num_beams", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  config = T5Config.from_pretrained_json(config_lib.ASSETS_DIR / "t5" / "t5-small-config.json")
  params = init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  input_ids = rng.integers(2, config.vocab_size, (args.batch_size, args.source_length),
                           dtype=np.int32)
  mask = np.ones_like(input_ids)
  # t5-small's summarization settings, with a fixed length so both sides do the same work.
  settings = decode.GenerationSettings(
      max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, min_length=0,
      length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=3)
  model = T5(config)
  generate = jax.jit(lambda p, i, m: decode.generate(model, p, i, m, settings))
  ours_tokens = None

  def run_ours():
    nonlocal ours_tokens
    ours_tokens = np.asarray(generate(params, input_ids, mask))

  start = time.perf_counter()
  run_ours()
  compile_s = time.perf_counter() - start
  ours_s = _time(run_ours, args.repeats)
  result = {"device": jax.devices()[0].device_kind, "batch_size": args.batch_size,
            "source_length": args.source_length, "settings": dataclasses.asdict(settings),
            "flax_sum_summaries_per_second": round(args.batch_size / ours_s, 3),
            "flax_sum_first_call_seconds": round(compile_s, 2)}
  try:
    import torch
    import transformers
  except ImportError:
    result["transformers_summaries_per_second"] = None
  else:
    with tempfile.TemporaryDirectory() as model_dir:
      hf_checkpoint.save_pretrained(model_dir, config, jax.device_get(params))
      torch_model = transformers.T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    theirs = {}

    def run_theirs():
      with torch.no_grad():
        theirs["tokens"] = torch_model.generate(
            input_ids=torch.tensor(input_ids, dtype=torch.long), attention_mask=torch.tensor(mask),
            do_sample=False, num_beams=settings.num_beams, max_length=settings.max_new_tokens + 1,
            min_length=0, length_penalty=settings.length_penalty, early_stopping=True,
            no_repeat_ngram_size=settings.no_repeat_ngram_size).numpy()[:, 1:]

    theirs_s = _time(run_theirs, args.repeats)
    result["transformers_summaries_per_second"] = round(args.batch_size / theirs_s, 3)
    result["speedup"] = round(theirs_s / ours_s, 2)
    result["torch_threads"] = torch.get_num_threads()
    expected = theirs["tokens"]
    width = min(expected.shape[1], ours_tokens.shape[1])
    result["same_tokens"] = bool((expected[:, :width] == ours_tokens[:, :width]).all())
  print(json.dumps(result))


if __name__ == "__main__":
  main()
