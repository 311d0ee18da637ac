"""Model FLOPs and the machine's peak, for throughput and model FLOPs utilisation (MFU).

MFU counts the FLOPs the model needs (the matmuls of a forward and backward pass over the
padded batch), not what the compiler happened to execute, divided by the time taken and the
devices' peak: the published dense bf16 peak for GPUs and TPUs, and on CPUs the measured
float32 matmul rate of this machine (CPUs publish no comparable number).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp

from flax_sum.model import T5Config

# Dense bfloat16 peak FLOP/s per device, by `device_kind` prefix (vendor data sheets).
PUBLISHED_PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12, "NVIDIA A10G": 125e12, "NVIDIA V100": 125e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12, "TPU v3": 123e12, "TPU v2": 46e12,
}


def forward_flops_per_example(config: T5Config, source_length: int, target_length: int) -> int:
  """FLOPs (2 per multiply-add) of one forward pass over one padded example: every matmul of
  the encoder, the decoder (attention over all positions, as computed) and the output layer."""
  d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  ff_macs = (3 if config.is_gated_act else 2) * d * ff
  encoder_token = 4 * d * inner + ff_macs + 2 * source_length * inner
  decoder_token = (4 * d * inner + 2 * target_length * inner  # self-attention
                   + 2 * d * inner + 2 * source_length * inner  # cross-attention q, o, scores
                   + ff_macs)
  cross_key_values = 2 * d * inner  # per source token and decoder layer
  num_decoder_layers = config.num_decoder_layers or config.num_layers
  macs = (source_length * config.num_layers * encoder_token
          + target_length * num_decoder_layers * decoder_token
          + source_length * num_decoder_layers * cross_key_values
          + target_length * d * config.vocab_size)
  return 2 * macs


def train_flops_per_example(config: T5Config, source_length: int, target_length: int) -> int:
  """Forward plus backward (twice the forward: gradients for activations and for weights)."""
  return 3 * forward_flops_per_example(config, source_length, target_length)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(size: int = 1024, repeats: int = 20) -> float:
  """The best float32 FLOP/s of a jitted square matmul on the default device. A CPU shared
  with other work has slow spells; the best of 20 (about 0.2 s at 1024) rides them out,
  where the best of 3 came out at half the rate once."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from)."""
  device = device or jax.local_devices()[0]
  for prefix, flops in PUBLISHED_PEAK_FLOPS.items():
    if device.device_kind.startswith(prefix):
      return flops, f"published bf16 peak of {prefix}"
  if device.platform == "cpu":
    # Simulated devices (--xla_force_host_platform_device_count) share the host's cores.
    return (measured_matmul_flops() / jax.local_device_count(),
            "measured float32 matmul rate of this CPU")
  return 0.0, f"unknown peak for {device.device_kind}"


class Throughput:
  """Non-padding tokens, examples and model FLOPs of the train steps, over the time they took.

  `report()` gives the rates since the previous report; `pause()`/`resume()` leave out time
  spent elsewhere (evaluation). Counts are this process's batches times the process count.
  """

  def __init__(self, model_config: T5Config, peak_flops_per_second: float,
               process_count: int = 1):
    self.model_config = model_config
    self.peak = peak_flops_per_second
    self.process_count = process_count
    self.interval = self._zero()
    self.total = self._zero()
    self._since = time.perf_counter()

  @staticmethod
  def _zero() -> dict[str, float]:
    return {"tokens": 0, "examples": 0, "flops": 0, "seconds": 0.0}

  def add(self, batch) -> None:
    source_width, target_width = batch["input_ids"].shape[-1], batch["labels"].shape[-1]
    rows = math.prod(batch["input_ids"].shape[:-1]) * self.process_count
    tokens = int(batch["attention_mask"].sum() + batch["decoder_attention_mask"].sum())
    self.interval["tokens"] += tokens * self.process_count
    self.interval["examples"] += rows
    self.interval["flops"] += rows * train_flops_per_example(self.model_config, source_width,
                                                             target_width)

  def pause(self) -> None:
    if self._since is not None:
      self.interval["seconds"] += time.perf_counter() - self._since
      self._since = None

  def resume(self) -> None:
    self._since = time.perf_counter()

  def _rates(self, counts: dict[str, float]) -> dict[str, float | None]:
    seconds = max(counts["seconds"], 1e-9)
    return {"tokens_per_second": round(counts["tokens"] / seconds, 1),
            "examples_per_second": round(counts["examples"] / seconds, 3),
            "mfu": round(counts["flops"] / seconds / self.peak, 4) if self.peak else None}

  def report(self) -> dict[str, float | None]:
    """The rates since the last report (which restarts the interval)."""
    self.pause()
    rates = self._rates(self.interval)
    for key, value in self.interval.items():
      self.total[key] += value
    self.interval = self._zero()
    self.resume()
    return rates

  def summary(self) -> dict[str, float | None]:
    """The rates over every reported interval."""
    return self._rates(self.total)
