"""Environment report and a smoke test of every device: `python -m flax_sum.env`.

Like `accelerate env` + `accelerate test` in the Hugging Face recipe: prints the versions that
matter, the backend, devices and processes, whether bfloat16 is native, then runs one tiny
jitted T5 train step on each local device and one pmapped over all of them.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import platform
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import jax_utils

from flax_sum import steps
from flax_sum.model import T5, T5Config, init_params

PACKAGES = ("flax-sum", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers",
            "datasets", "tokenizers", "sentencepiece", "safetensors", "huggingface-hub",
            "rouge-score", "ml-collections", "numpy")
# Backends whose matrix units compute in bfloat16 natively; the CPU emulates it.
BF16_NATIVE_BACKENDS = ("tpu", "gpu", "cuda", "rocm")


def package_versions() -> dict[str, str | None]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def describe_environment() -> dict[str, Any]:
  devices = jax.devices()
  return {
      "python": platform.python_version(),
      "platform": platform.platform(),
      "packages": package_versions(),
      "backend": jax.default_backend(),
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "local_device_count": jax.local_device_count(),
      "device_count": jax.device_count(),
      "devices": sorted({f"{d.platform}:{d.device_kind}" for d in devices}),
      "bf16_native": jax.default_backend() in BF16_NATIVE_BACKENDS,
  }


def _smoke_model() -> T5:
  return T5(T5Config.from_hf_dict({
      "vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1,
      "num_decoder_layers": 1, "num_heads": 2, "relative_attention_num_buckets": 8,
      "relative_attention_max_distance": 16, "dropout_rate": 0.0}))


def _smoke_batch(num_devices: int, per_device: int = 2, length: int = 8) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 64, (num_devices, per_device, length)).astype(np.int32)
  ones = np.ones_like(ids)
  return {"input_ids": ids, "attention_mask": ones, "decoder_input_ids": ids,
          "labels": ids, "decoder_attention_mask": ones}


def smoke_test() -> dict[str, Any]:
  """One train step per device (jit) and one over all local devices (pmap).

  Every device must give the same loss for the same data, and the pmapped step must agree with
  them: a device that computes wrongly or not at all shows up here.
  """
  model = _smoke_model()
  params = init_params(model.config, jax.random.PRNGKey(0))
  state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
  step = functools.partial(steps.train_step, learning_rate_fn=lambda _: 0.1)
  batch = _smoke_batch(1)
  per_device_losses = {}
  start = time.perf_counter()
  for device in jax.local_devices():
    # A one-device pmap gives train_step its axis name; it compiles the same program as jit.
    run = jax.pmap(step, axis_name=steps.AXIS, in_axes=(0, 0, None), devices=[device])
    _, metrics = run(jax_utils.replicate(state, devices=[device]), batch,
                     jax.random.PRNGKey(1))
    per_device_losses[str(device)] = float(metrics["loss"][0] / metrics["denominator"][0])
  # All devices at once, each with the same rows: every replica must agree with the above.
  num_devices = jax.local_device_count()
  all_devices = jax.pmap(step, axis_name=steps.AXIS, in_axes=(0, 0, None))
  same_rows = {key: np.repeat(value, num_devices, axis=0) for key, value in batch.items()}
  _, metrics = all_devices(jax_utils.replicate(state), same_rows, jax.random.PRNGKey(1))
  pmap_loss = float(metrics["loss"][0] / metrics["denominator"][0])
  losses = list(per_device_losses.values())
  consistent = bool(np.allclose(losses, losses[0], rtol=1e-5)
                    and np.isclose(pmap_loss, losses[0], rtol=1e-5)
                    and np.isfinite(pmap_loss))
  return {"per_device_loss": per_device_losses, "pmap_loss": pmap_loss, "ok": consistent,
          "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m flax_sum.env", description=__doc__)
  parser.add_argument("--json", action="store_true", help="Print one JSON object.")
  parser.add_argument("--skip_test", action="store_true",
                      help="Only report the environment; run no step.")
  args = parser.parse_args(argv)
  report = describe_environment()
  if not args.skip_test:
    report["smoke_test"] = smoke_test()
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    for key, value in report.items():
      if key == "packages":
        print("packages:")
        for name, version in value.items():
          print(f"  {name:18} {version or 'not installed'}")
      elif key == "smoke_test":
        status = "passed" if value["ok"] else "FAILED"
        print(f"smoke test: {status} (one train step on each of {len(value['per_device_loss'])}"
              f" devices and pmapped over all, loss {value['pmap_loss']:.6f}, "
              f"{value['seconds']} s)")
      else:
        print(f"{key}: {value}")
  return 0 if args.skip_test or report["smoke_test"]["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
