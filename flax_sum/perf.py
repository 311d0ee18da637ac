"""Model FLOPs and the machine's peak, for throughput and model FLOPs utilisation (MFU).

MFU counts the FLOPs the model needs (the matmuls of a forward and backward pass over the
padded batch), not what the compiler happened to execute, divided by the time taken and the
devices' peak: the published dense bf16 peak for GPUs and TPUs, and on CPUs the measured
float32 matmul rate of this machine (CPUs publish no comparable number).

The `matmuls_only_*` programs run exactly the model's matmuls at a given shape and nothing
else, so their time on a device is the floor of a train step or a beam search built from the
same XLA matmuls there: how far the trainer is from it, and which speed targets it allows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flax_sum import model as model_lib
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
  macs = (source_length * config.num_layers * encoder_token
          + target_length * config.num_decoder_layers * decoder_token
          + source_length * config.num_decoder_layers * cross_key_values
          + target_length * d * config.vocab_size)
  return 2 * macs


def train_flops_per_example(config: T5Config, source_length: int, target_length: int) -> int:
  """Forward plus backward (twice the forward: gradients for activations and for weights)."""
  return 3 * forward_flops_per_example(config, source_length, target_length)


@dataclasses.dataclass(frozen=True)
class MatmulsOnly:
  """A jitted program and its arguments; `run()` calls it and waits for the result."""
  fn: Callable[..., Any]
  args: tuple[Any, ...]

  def run(self) -> None:
    jax.block_until_ready(self.fn(*self.args))


def _matmuls_only_weights(config: T5Config, rng: jax.Array) -> dict[str, Any]:
  """Random weights with the shapes of every matrix the model multiplies by, one dict per
  layer (slicing stacked layers would copy every weight at every step)."""
  d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  shapes = {"q": (d, inner), "k": (d, inner), "v": (d, inner), "o": (inner, d), "wo": (ff, d)}
  shapes.update({"wi_0": (d, ff), "wi_1": (d, ff)} if config.is_gated_act else {"wi": (d, ff)})
  decoder_shapes = dict(shapes, **{"cross_" + name: shapes[name] for name in "qkvo"})
  shapes = {"encoder": [shapes] * config.num_layers,
            "decoder": [decoder_shapes] * config.num_decoder_layers,
            "output_embedding": (config.vocab_size, d)}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(key, shape, jnp.float32)
                                      for key, shape in zip(keys, leaves)])


def _weight_matmul(config: T5Config, x: jax.Array, w: jax.Array) -> jax.Array:
  return model_lib.matmul(x, w.astype(config.dtype), 0, config.dtype)


def _heads(config: T5Config, x: jax.Array, w: jax.Array) -> jax.Array:
  """The projection x w ([inputs, length, heads * d_kv]) split heads-major."""
  return model_lib.split_heads(config, _weight_matmul(config, x, w))


def _attention_matmuls(config: T5Config, query: jax.Array, key: jax.Array, value: jax.Array,
                       key_transposed: bool = False) -> jax.Array:
  """The two matmuls of attention, without the softmax: query [inputs, group * length, inner]
  (the `group` rows that share an input's keys, as beams do) against heads-major key [inputs,
  heads, kv_length, d_kv] ([inputs, heads, d_kv, kv_length] if `key_transposed`, as decoding
  caches it) and value [inputs, heads, kv_length, d_kv]."""
  scores = model_lib.accumulating_einsum(
      "bhmd,bhdk->bhmk" if key_transposed else "bhmd,bhkd->bhmk",
      model_lib.split_heads(config, query), key, config.dtype)
  # relu where the model has its softmax: one element-wise pass over the scores, as there.
  out = model_lib.accumulating_einsum("bhmk,bhkd->bhmd", jax.nn.relu(scores), value,
                                      config.dtype)
  return jnp.swapaxes(out, 1, 2).reshape(query.shape)


def _feed_forward_matmuls(config: T5Config, layer: dict[str, Any], x: jax.Array) -> jax.Array:
  up = lambda name: _weight_matmul(config, x, layer[name])
  h = jax.nn.relu(up("wi_0")) * up("wi_1") if config.is_gated_act else jax.nn.relu(up("wi"))
  return _weight_matmul(config, h, layer["wo"])


def _encoder_matmuls(config: T5Config, weights: dict[str, Any], x: jax.Array) -> jax.Array:
  for layer in weights["encoder"]:
    attended = _attention_matmuls(config, _weight_matmul(config, x, layer["q"]),
                                  _heads(config, x, layer["k"]), _heads(config, x, layer["v"]))
    x = x + _weight_matmul(config, attended, layer["o"])
    x = x + _feed_forward_matmuls(config, layer, x)
  return x


def _decoder_layer_matmuls(config: T5Config, layer: dict[str, Any], x: jax.Array,
                           self_key_value: tuple[jax.Array, jax.Array],
                           cross_key_value: tuple[jax.Array, jax.Array],
                           key_transposed: bool = False) -> jax.Array:
  """x [rows, length, d_model] through one decoder layer's matmuls, given heads-major keys
  and values (see `_attention_matmuls`)."""
  for prefix, (key, value) in (("", self_key_value), ("cross_", cross_key_value)):
    query = _weight_matmul(config, x.reshape(key.shape[0], -1, x.shape[-1]), layer[prefix + "q"])
    attended = _attention_matmuls(config, query, key, value, key_transposed)
    x = x + _weight_matmul(config, attended, layer[prefix + "o"]).reshape(x.shape)
  return x + _feed_forward_matmuls(config, layer, x)


def matmuls_only_train_step(config: T5Config, batch_size: int, source_length: int,
                            target_length: int) -> MatmulsOnly:
  """The loss and gradient, for weights and inputs, of a network made of exactly the matmuls
  that `train_flops_per_example` counts, with relu and residual adds between them and nothing
  else: no softmax, norms, dropout, cross-entropy or optimizer. On a device, its time is what
  no train step built from the same XLA matmuls can beat (the ceiling of MFU and speedups)."""
  rngs = jax.random.split(jax.random.key(0), 4)
  weights = _matmuls_only_weights(config, rngs[0])
  source = jax.random.normal(rngs[1], (batch_size, source_length, config.d_model), config.dtype)
  target = jax.random.normal(rngs[2], (batch_size, target_length, config.d_model), config.dtype)
  logits_cotangent = jax.random.normal(rngs[3], (batch_size, target_length, config.vocab_size))

  def loss(weights, source, target):
    encoded = _encoder_matmuls(config, weights, source)
    x = target
    for layer in weights["decoder"]:
      self_kv = (_heads(config, x, layer["k"]), _heads(config, x, layer["v"]))
      cross_kv = (_heads(config, encoded, layer["cross_k"]),
                  _heads(config, encoded, layer["cross_v"]))
      x = _decoder_layer_matmuls(config, layer, x, self_kv, cross_kv)
    logits = model_lib.matmul(x, weights["output_embedding"].astype(config.dtype), 1,
                              jnp.float32)
    return jnp.sum(logits * logits_cotangent)  # Not a constant: XLA would fold the matmul.

  # The loss too: with only the gradient asked for, the forward output layer is dead code.
  return MatmulsOnly(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                     (weights, source, target))


def matmuls_only_decoding_step(config: T5Config, batch_size: int, rows_per_input: int,
                               source_length: int, cache_length: int) -> MatmulsOnly:
  """One decoding step's matmuls for batch_size * rows_per_input rows (the beams): each row's
  projections, whose key/value go into the cache at a given position, attention to the row's
  `cache_length` cached tokens and to its input's `source_length` encoder keys/values (all
  cached heads-major, keys transposed, as flax-sum's decoder caches them), the feed-forward
  blocks and the output layer. Takes (weights, x, self_cache, cross_cache, position) and
  returns the next x (which depends on the logits' maximum) and the self-attention cache."""
  rows = batch_size * rows_per_input
  rngs = jax.random.split(jax.random.key(0), 3)
  weights = _matmuls_only_weights(config, rngs[0])
  layers, heads, d_kv = config.num_decoder_layers, config.num_heads, config.d_kv

  # Per layer: keys [inputs, heads, d_kv, length] and values [inputs, heads, length, d_kv].
  def cache(rng, inputs, length):
    key_rng, value_rng = jax.random.split(rng)
    return (jax.random.normal(key_rng, (inputs, heads, d_kv, length), config.dtype),
            jax.random.normal(value_rng, (inputs, heads, length, d_kv), config.dtype))

  self_cache = [cache(rng, rows, cache_length) for rng in jax.random.split(rngs[1], layers)]
  cross_cache = [cache(rng, batch_size, source_length)
                 for rng in jax.random.split(rngs[2], layers)]

  def step(weights, x, self_cache, cross_cache, position):
    updated = []
    for layer, (keys, values), cross in zip(weights["decoder"], self_cache, cross_cache):
      key, value = (_weight_matmul(config, x, layer[name]) for name in "kv")
      keys = jax.lax.dynamic_update_slice(keys, key.reshape(rows, heads, d_kv, 1),
                                          (0, 0, 0, position))
      values = jax.lax.dynamic_update_slice(values, value.reshape(rows, heads, 1, d_kv),
                                            (0, 0, position, 0))
      updated.append((keys, values))
      x = _decoder_layer_matmuls(config, layer, x[:, None], (keys, values), cross,
                                 key_transposed=True)[:, 0]
    logits = jnp.einsum("vd,bd->bv", weights["output_embedding"].astype(config.dtype), x,
                        preferred_element_type=jnp.float32)
    return x + jnp.max(logits, axis=-1, keepdims=True).astype(x.dtype), updated

  x = jnp.zeros((rows, config.d_model), config.dtype)
  return MatmulsOnly(jax.jit(step), (weights, x, self_cache, cross_cache, cache_length - 1))


def matmuls_only_generate(config: T5Config, batch_size: int, source_length: int,
                          num_beams: int, max_new_tokens: int) -> MatmulsOnly:
  """Beam search's matmuls: the encoder forward, the decoder's cross-attention keys/values,
  then `max_new_tokens` decoding steps (`matmuls_only_decoding_step`) of batch_size * num_beams
  rows over a cache of max_new_tokens positions."""
  single = matmuls_only_decoding_step(config, batch_size, num_beams, source_length,
                                      max_new_tokens)
  weights, x, self_cache = single.args[:3]
  source = jax.random.normal(jax.random.key(1), (batch_size, source_length, config.d_model),
                             config.dtype)

  def generate(weights, x, self_cache, source):
    encoded = _encoder_matmuls(config, weights, source)
    cross_cache = [(jnp.swapaxes(_heads(config, encoded, layer["cross_k"]), 2, 3),
                    _heads(config, encoded, layer["cross_v"])) for layer in weights["decoder"]]
    return jax.lax.fori_loop(
        0, max_new_tokens,
        lambda position, carry: single.fn(weights, *carry, cross_cache, position),
        (x, self_cache))

  return MatmulsOnly(jax.jit(generate), (weights, x, self_cache, source))


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
