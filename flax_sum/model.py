"""T5 in Flax linen, equivalent to Hugging Face's `T5ForConditionalGeneration`.

Parameter names follow Hugging Face's so the checkpoint mapping is mechanical, e.g.
`encoder/block_0/layer_0/SelfAttention/q/kernel` holds the transpose of
`encoder.block.0.layer.0.SelfAttention.q.weight`. Every layer norm scale lives under a path
component containing `layer_norm` (`.../layer_norm/scale`, `encoder/final_layer_norm/scale`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_sum.errors import UserError

Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
}

# Hugging Face config keys derived from others, or describing the saved file rather than the
# model; they are recomputed by `to_hf_dict` instead of being carried over in `extra`.
_DERIVED_HF_KEYS = frozenset({
    "dense_act_fn", "is_gated_act", "scale_decoder_outputs", "transformers_version",
    "_name_or_path", "torch_dtype", "dtype", "architectures", "model_type", "is_encoder_decoder",
})


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The Hugging Face T5 fields the model needs, plus the compute dtype."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None  # None: same as num_layers (Hugging Face semantics).
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  initializer_factor: float = 1.0
  dtype: Any = jnp.float32
  # Other keys of the original config.json (e.g. task_specific_params), written back on save.
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    self._check_sizes_and_rates()
    parts = (self.feed_forward_proj.split("-") if isinstance(self.feed_forward_proj, str)
             else [])
    if (not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated")
        or self.dense_act_fn not in _ACTIVATIONS):
      raise UserError(
          f"feed_forward_proj {self.feed_forward_proj!r} is not supported: use 'relu' (T5 v1.0), "
          "'gated-gelu' (T5 v1.1, flan-t5), 'gated-relu', 'gated-silu', 'gelu' or 'silu'")

  def _check_sizes_and_rates(self) -> None:
    """One line naming the key of a config.json value of the wrong type or range, instead of a
    TypeError deep in the model later (JSON's true/false are not numbers here)."""
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    is_number = lambda v: is_int(v) or isinstance(v, (float, np.floating))
    checks = [(name, "a positive integer", lambda v: is_int(v) and v >= 1)
              for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                           "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
                           "relative_attention_max_distance")]
    checks += [("dropout_rate", "a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1),
               ("layer_norm_epsilon", "a positive number",
                lambda v: is_number(v) and 0 < v < math.inf)]
    for name, expected, is_valid in checks:
      value = getattr(self, name)
      if not is_valid(value):
        raise UserError(f"config.json: {name} must be {expected}, got {value!r}: fix the "
                        "model's config.json")

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    # Hugging Face maps 'gated-gelu' to the tanh approximation for backwards compatibility.
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_hf_dict(cls, hf_dict: Mapping[str, Any], **overrides: Any) -> "T5Config":
    """Builds a config from a Hugging Face config.json dict; unknown keys go to `extra`."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "extra"}
    kwargs = {k: hf_dict[k] for k in fields if k in hf_dict and hf_dict[k] is not None}
    # transformers 5 always writes tie_word_embeddings=true and records an untied (T5 v1.1)
    # head as scale_decoder_outputs=false.
    kwargs["tie_word_embeddings"] = (hf_dict.get("tie_word_embeddings", True) is not False
                                     and hf_dict.get("scale_decoder_outputs", True) is not False)
    if isinstance(kwargs.get("eos_token_id"), (list, tuple)):
      kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    if hf_dict.get("model_type", "t5") != "t5":
      raise UserError(f"model_type {hf_dict['model_type']!r} is not supported: only T5 models "
                      "(model_type 't5') can be trained")
    extra = {k: v for k, v in hf_dict.items() if k not in fields and k not in _DERIVED_HF_KEYS}
    kwargs.update(overrides)
    return cls(**kwargs, extra=extra)

  @classmethod
  def from_pretrained_json(cls, path: str | os.PathLike, **overrides: Any) -> "T5Config":
    """Reads a Hugging Face config.json, given as the file or its directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    try:
      with open(path, encoding="utf-8") as f:
        hf_dict = json.load(f)
    except FileNotFoundError:
      raise UserError(f"no T5 config at {path}: expected a config.json file or a directory "
                      "holding one") from None
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"cannot read the T5 config {path}: {e}") from None
    return cls.from_hf_dict(hf_dict, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """The config.json dict that transformers' `T5Config` reads back with the same fields."""
    hf_dict = dict(self.extra)
    hf_dict.update(
        model_type="t5",
        architectures=["T5ForConditionalGeneration"],
        is_encoder_decoder=True,
        vocab_size=self.vocab_size,
        d_model=self.d_model,
        d_kv=self.d_kv,
        d_ff=self.d_ff,
        num_layers=self.num_layers,
        num_decoder_layers=self.num_decoder_layers,
        num_heads=self.num_heads,
        relative_attention_num_buckets=self.relative_attention_num_buckets,
        relative_attention_max_distance=self.relative_attention_max_distance,
        dropout_rate=self.dropout_rate,
        layer_norm_epsilon=self.layer_norm_epsilon,
        feed_forward_proj=self.feed_forward_proj,
        dense_act_fn=self.dense_act_fn,
        is_gated_act=self.is_gated_act,
        tie_word_embeddings=self.tie_word_embeddings,
        # transformers 5 keys the d_model**-0.5 output scaling on this.
        scale_decoder_outputs=self.tie_word_embeddings,
        pad_token_id=self.pad_token_id,
        eos_token_id=self.eos_token_id,
        decoder_start_token_id=self.decoder_start_token_id,
        initializer_factor=self.initializer_factor,
    )
    return dict(sorted(hf_dict.items()))


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """Maps key_position - query_position to T5's buckets: exact near 0, logarithmic further out."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # The clamp keeps log() finite where the exact branch is selected anyway.
  log_ratio = (jnp.log(jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact))
  if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
  if_large = jnp.minimum(if_large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, if_large)


def init_stddev(config: T5Config, module_name: str) -> float:
  """The standard deviation of a weight's normal init, as in Hugging Face's `_init_weights`."""
  d_model, inner_dim = config.d_model, config.num_heads * config.d_kv
  return config.initializer_factor * {
      "shared": 1.0, "lm_head": 1.0,
      "q": (d_model * config.d_kv)**-0.5, "k": d_model**-0.5, "v": d_model**-0.5,
      "o": inner_dim**-0.5, "relative_attention_bias": d_model**-0.5,
      "wi": d_model**-0.5, "wi_0": d_model**-0.5, "wi_1": d_model**-0.5,
      "wo": config.d_ff**-0.5,
  }[module_name]


def _normal_init(config: T5Config, module_name: str) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=init_stddev(config, module_name))


def narrow_matmuls_are_slow(dtype: Any) -> bool:
  """Whether matmuls over half-precision `dtype` operands should ask for float32 outputs.

  XLA's CPU backend runs a matmul with a bfloat16 output 2-6x slower than the same matmul with
  a float32 output, which in turn is 1.3-1.8x faster than one over float32 operands (t5-small's
  shapes, Zen 4). GPUs and TPUs accumulate in float32 either way and write narrow outputs
  directly.
  """
  return jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == "cpu"


def _plain_matmul(x: Array, w: Array, w_contracting: int, out_dtype: Any) -> Array:
  """x [..., K] times the matrix w ([K, N], or [N, K] with w_contracting 1), output `out_dtype`.

  x is flattened to rows first. The weight gradient of a matmul over [batch, length, K]
  contracts two axes, and XLA's CPU backend lowers such a dot by writing the cotangent out
  transposed (31 ms for each t5-small feed-forward layer at batch 8 x 256 tokens); over rows
  it contracts one axis in place.
  """
  rows = x.reshape(-1, x.shape[-1])
  out = jax.lax.dot_general(rows, w, (((1,), (w_contracting,)), ((), ())),
                            preferred_element_type=out_dtype)
  return out.reshape(*x.shape[:-1], out.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _float32_accumulated_matmul(x: Array, w: Array, w_contracting: int, out_dtype: Any) -> Array:
  """`_plain_matmul` over narrow operands with a float32 output, rounded to `out_dtype`. Its
  gradients are such matmuls too: differentiating the float32-output matmul itself would
  multiply the narrow operands by a float32 cotangent, in float32."""
  return _plain_matmul(x, w, w_contracting, jnp.float32).astype(out_dtype)


def _float32_accumulated_matmul_fwd(x, w, w_contracting, out_dtype):
  return _float32_accumulated_matmul(x, w, w_contracting, out_dtype), (x, w)


def _float32_accumulated_matmul_bwd(w_contracting, out_dtype, residuals, grad):
  x, w = residuals
  grad = grad.astype(x.dtype)
  dx = _plain_matmul(grad, w, 1 - w_contracting, jnp.float32)
  rows_x, rows_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
  dw = jax.lax.dot_general(*((rows_x, rows_grad) if w_contracting == 0 else (rows_grad, rows_x)),
                           (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_float32_accumulated_matmul.defvjp(_float32_accumulated_matmul_fwd,
                                   _float32_accumulated_matmul_bwd)


def matmul(x: Array, w: Array, w_contracting: int, out_dtype: Any) -> Array:
  """x [..., K] times the matrix w ([K, N], or [N, K] with w_contracting 1) in `out_dtype`."""
  if narrow_matmuls_are_slow(x.dtype):
    return _float32_accumulated_matmul(x, w, w_contracting, jnp.dtype(out_dtype))
  return _plain_matmul(x, w, w_contracting, out_dtype)


def accumulating_einsum(spec: str, a: Array, b: Array, dtype: Any) -> Array:
  """`jnp.einsum` over `dtype` operands with a `dtype` result, accumulated in float32 where
  narrow outputs are slow (see `narrow_matmuls_are_slow`)."""
  accumulate = jnp.float32 if narrow_matmuls_are_slow(dtype) else None
  return jnp.einsum(spec, a, b, preferred_element_type=accumulate).astype(dtype)


def split_heads(config: T5Config, t: Array) -> Array:
  """[rows, length, heads * d_kv] -> heads-major [rows, heads, length, d_kv]."""
  return jnp.swapaxes(t.reshape(t.shape[:2] + (config.num_heads, config.d_kv)), 1, 2)


def _dense_dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                       preferred_element_type: Any = None) -> Array:
  """nn.Dense's matmul (x [..., K] times the kernel [K, N]) through `matmul`."""
  del dimension_numbers, precision  # Always Dense's: the last axis of x with the kernel's first.
  return matmul(lhs, rhs, 0, preferred_element_type or lhs.dtype)


def _dense(config: T5Config, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, kernel_init=_normal_init(config, name),
                  dtype=config.dtype, dot_general=_dense_dot_general, name=name)


def _mix32(h: Array) -> Array:
  """MurmurHash3's 32-bit finaliser: a bijection whose output bits all depend on every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hashed_random_bits(seeds: Array, shape: tuple[int, ...]) -> Array:
  """uint32 [shape] that look uniformly random: two hash rounds of each element's flat index,
  keyed by two uint32 seeds. Element-wise arithmetic only, so XLA fuses it into the consumer."""
  counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _mix32(_mix32(counter ^ seeds[0]) ^ seeds[1])


@jax.custom_vjp
def add_position_bias(scores: Array, position_bias: Array) -> Array:
  """`scores + position_bias`, the bias broadcast over the batch (and beam) axes.

  Its gradient sums over the batch with a matmul against ones: XLA's CPU reduce over a leading
  axis took 154 ms of a 4.3 s t5-small train step for what the matmul does in 4.
  """
  return scores + position_bias


def _add_position_bias_forward(scores: Array, position_bias: Array) -> tuple[Array, Array]:
  return scores + position_bias, position_bias


def _add_position_bias_backward(position_bias: Array, grad: Array) -> tuple[Array, Array]:
  broadcast_axes = [axis for axis, (size, bias_size) in enumerate(zip(grad.shape,
                                                                      position_bias.shape))
                    if bias_size == 1 and size != 1]
  bias_grad = grad
  if broadcast_axes[:1] == [0]:
    bias_grad = jnp.tensordot(jnp.ones(grad.shape[0], grad.dtype), grad, axes=(0, 0),
                              precision=jax.lax.Precision.HIGHEST)[None]
    broadcast_axes = broadcast_axes[1:]
  bias_grad = jnp.sum(bias_grad, axis=tuple(broadcast_axes), keepdims=True)
  return grad, bias_grad.astype(position_bias.dtype)


add_position_bias.defvjp(_add_position_bias_forward, _add_position_bias_backward)


class Dropout(nn.Module):
  """Inverted dropout like `nn.Dropout`, with masks hashed from one draw of the 'dropout' rng.

  `nn.Dropout` draws a threefry number per element, which on CPUs took a third of the t5-small
  train step; hashing the element index with a per-call seed costs no more than a copy. Each
  element is dropped with probability `rate` (to 2**-32), independently across calls and steps.
  """
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    seeds = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
    keep = hashed_random_bits(seeds, x.shape) >= jnp.uint32(round(self.rate * 2**32))
    return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


class T5LayerNorm(nn.Module):
  """RMS norm: no mean subtraction and no bias; statistics in float32."""
  epsilon: float
  dtype: Any
  scale_init: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.constant(self.scale_init), (x.shape[-1],),
                       jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale).astype(self.dtype)


class T5Attention(nn.Module):
  """Multi-head attention without 1/sqrt(d_kv) scaling, with T5's relative position bias.

  Self-attention when `kv_source` is None, else attention over `kv_source` (the encoder output).
  With `decode=True` the module keeps a 'cache' collection: the first call (cache absent) sizes it
  from the full-length input; every later call processes one new token.
  """
  config: T5Config
  causal: bool = False
  has_relative_attention_bias: bool = False

  def _relative_bias(self, query_length: int, key_length: int, query_offset: Array | int,
                     keys_per_position: int = 1) -> Array:
    cfg = self.config
    query_position = jnp.arange(query_length, dtype=jnp.int32)[:, None] + query_offset
    key_position = jnp.arange(key_length, dtype=jnp.int32)[None, :] // keys_per_position
    buckets = relative_position_bucket(
        key_position - query_position, bidirectional=not self.causal,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                     embedding_init=_normal_init(cfg, "relative_attention_bias"),
                     name="relative_attention_bias")
    return jnp.transpose(table(buckets), (2, 0, 1))[None]  # [1, heads, query, key], float32

  def _create_self_attention_cache(self, rows: int, max_length: int, rows_per_input: int,
                                   dtype: Any) -> None:
    cfg = self.config
    inputs, group = rows // rows_per_input, rows_per_input
    slots = max_length * group  # Slot t * group + j holds the key/value of step t of beam j.
    self.variable("cache", "cached_key", jnp.zeros, (inputs, cfg.num_heads, cfg.d_kv, slots),
                  dtype)
    self.variable("cache", "cached_value", jnp.zeros, (inputs, cfg.num_heads, slots, cfg.d_kv),
                  dtype)
    self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if group > 1:
      self.variable("cache", "cache_ancestry", jnp.zeros, (rows, max_length), jnp.int32)

  def _cached_self_attention(self, key: Array, value: Array,
                             rows_per_input: int) -> tuple[Array, Array, Array, Array]:
    """Stores one decoding step's keys/values [rows, 1, heads * d_kv] in the cache and returns
    what the rows attend to: keys [inputs, heads, d_kv, slots], values [inputs, heads, slots,
    d_kv], the mask [inputs, 1, group, 1, slots] and this step's position.

    The beams of an input never move their cached keys/values: at step t the beam in slot j
    writes at slot t * group + j, and `cache_ancestry` [rows, max_length] records in which beam
    slot each earlier token of its sequence lies. Beam search reorders only that small table
    (`decode.reorder_beam_ancestry`), where moving the caches took an eighth of a t5-small
    decoding step; each beam attends to every slot of its input with the others masked out.
    """
    cfg = self.config
    rows = key.shape[0]
    if key.shape[1] != 1:
      raise ValueError(f"a cached decoding step takes one token per call, got {key.shape[1]}")
    inputs, group = rows // rows_per_input, rows_per_input
    cached_key = self.variable("cache", "cached_key")
    cached_value = self.variable("cache", "cached_value")
    cache_index = self.variable("cache", "cache_index")
    index = cache_index.value
    max_length = cached_value.value.shape[2] // group
    by_slot = lambda t: t.reshape(inputs, group, cfg.num_heads, cfg.d_kv).astype(
        cached_key.value.dtype)
    cached_key.value = jax.lax.dynamic_update_slice(
        cached_key.value, by_slot(key).transpose(0, 2, 3, 1), (0, 0, 0, index * group))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, by_slot(value).transpose(0, 2, 1, 3), (0, 0, index * group, 0))
    cache_index.value = index + 1
    is_filled = jnp.arange(max_length) <= index
    if group > 1:
      ancestry = self.variable("cache", "cache_ancestry")
      ancestry.value = jax.lax.dynamic_update_slice(
          ancestry.value, (jnp.arange(rows, dtype=jnp.int32) % group)[:, None], (0, index))
      # [inputs, query slot, position, key slot]
      visible = ((ancestry.value.reshape(inputs, group, max_length)[..., None]
                  == jnp.arange(group)) & is_filled[:, None])
    else:
      visible = is_filled[None, None, :, None]
    mask = visible.reshape(visible.shape[0], 1, group, 1, max_length * group)
    return cached_key.value, cached_value.value, mask, index

  @nn.compact
  def __call__(self, x: Array, kv_source: Array | None = None, mask: Array | None = None,
               position_bias: Array | None = None, deterministic: bool = True,
               decode: bool = False, rows_per_input: int = 1) -> tuple[Array, Array | None]:
    """Attention output [batch, length, d_model] and the position bias it used.

    `kv_source` (cross-attention) may hold fewer rows than `x`: every group of batch // rows
    consecutive query rows attends to one source row, as the beams of one input do, so the
    encoder keys/values are computed and cached once per input rather than once per beam.

    In decoding self-attention, each group of `rows_per_input` consecutive rows (the beams of
    one input) shares one cache: see `_cached_self_attention`.
    """
    cfg = self.config
    batch, length = x.shape[:2]
    # Heads-major [batch, heads, length, d_kv]: the layout of the attention matmuls and of the
    # cache, so that a decoding step does not transpose the cached keys/values.
    heads_major = functools.partial(split_heads, cfg)
    query = heads_major(_dense(cfg, cfg.num_heads * cfg.d_kv, "q")(x))
    project_key = _dense(cfg, cfg.num_heads * cfg.d_kv, "k")
    project_value = _dense(cfg, cfg.num_heads * cfg.d_kv, "v")
    query_offset = 0
    keys_per_position = 1

    # Decoding caches the encoder's keys as [rows, heads, d_kv, source length]: XLA's CPU matmul
    # repacks a [length, d_kv] operand at every step, a third slower than a [d_kv, length] one.
    key_transposed = False
    if kv_source is not None:
      if decode and self.has_variable("cache", "cached_key"):
        # The encoder's keys/values were stored when the cache was created.
        key = self.get_variable("cache", "cached_key")
        value = self.get_variable("cache", "cached_value")
      else:
        key = heads_major(project_key(kv_source))
        value = heads_major(project_value(kv_source))
        if decode:
          key = jnp.swapaxes(key, 2, 3)
          self.variable("cache", "cached_key", lambda: key)
          self.variable("cache", "cached_value", lambda: value)
      key_transposed = decode
    elif decode and self.has_variable("cache", "cached_key"):
      key, value, mask, query_offset = self._cached_self_attention(
          project_key(x), project_value(x), rows_per_input)
      key_transposed = True
      keys_per_position = rows_per_input
    else:
      key = heads_major(project_key(x))
      value = heads_major(project_value(x))
      if decode:  # Creates the cache, sized by this full-length call.
        self._create_self_attention_cache(batch, length, rows_per_input, key.dtype)

    kv_length = value.shape[2]
    if position_bias is None and self.has_relative_attention_bias:
      position_bias = self._relative_bias(length, kv_length, query_offset, keys_per_position)

    # The queries of a group that shares a source row (the beams of one input; otherwise the
    # group is 1) become extra query rows of that source row: [source rows, heads, group *
    # query, d_kv]. Both matmuls are then plain batched matmuls over (source row, head); with
    # the group as a dimension of its own, XLA's CPU backend ran the beams' cross-attention as
    # matmuls 4 columns wide, a fifth of a decoding step.
    rows, group = key.shape[0], batch // key.shape[0]
    grouped = lambda t: jnp.swapaxes(
        t.reshape((rows, group) + t.shape[1:]), 1, 2).reshape(rows, cfg.num_heads, -1,
                                                              t.shape[-1])
    scores = jnp.einsum("bhmd,bhdk->bhmk" if key_transposed else "bhmd,bhkd->bhmk",
                        grouped(query), key, preferred_element_type=jnp.float32)
    scores = scores.reshape(rows, cfg.num_heads, group, length, kv_length)
    if position_bias is not None:
      scores = add_position_bias(scores, position_bias[:, :, None])
    if mask is not None:
      if mask.ndim == 4:  # [rows, 1, query, key]: the same for every row of a group.
        mask = mask[:, :, None]
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = Dropout(cfg.dropout_rate)(probs, deterministic=deterministic)
    out = accumulating_einsum(
        "bhmk,bhkd->bhmd", probs.astype(cfg.dtype).reshape(rows, cfg.num_heads, -1, kv_length),
        value.astype(cfg.dtype), cfg.dtype)
    # [rows, heads, group, query, d_kv] -> [rows * group, query, heads * d_kv]
    out = out.reshape(rows, cfg.num_heads, group, length, cfg.d_kv).transpose(0, 2, 3, 1, 4)
    out = out.reshape(batch, length, cfg.num_heads * cfg.d_kv)
    out = _dense(cfg, cfg.d_model, "o")(out)
    return out, position_bias


class T5DenseReluDense(nn.Module):
  """The feed-forward block: act(x wi) wo, or act(x wi_0) * (x wi_1) wo when gated."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    dense = lambda features, name: _dense(cfg, features, name)
    activation = _ACTIVATIONS[cfg.dense_act_fn]
    if cfg.is_gated_act:
      h = activation(dense(cfg.d_ff, "wi_0")(x)) * dense(cfg.d_ff, "wi_1")(x)
    else:
      h = activation(dense(cfg.d_ff, "wi")(x))
    h = Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(cfg.d_model, "wo")(h)


def _layer_norm(config: T5Config, name: str) -> T5LayerNorm:
  return T5LayerNorm(config.layer_norm_epsilon, config.dtype,
                     scale_init=config.initializer_factor, name=name)


class T5Block(nn.Module):
  """Pre-norm residual sublayers: self-attention, cross-attention (decoder), feed-forward."""
  config: T5Config
  is_decoder: bool
  has_relative_attention_bias: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, position_bias: Array | None,
               encoded: Array | None, encoder_mask: Array | None, deterministic: bool,
               decode: bool) -> tuple[Array, Array]:
    cfg = self.config
    # Decoding beams: consecutive decoder rows that share one encoder row (see T5Attention).
    rows_per_input = x.shape[0] // encoded.shape[0] if self.is_decoder else 1
    x, position_bias = _SelfAttentionLayer(
        cfg, self.is_decoder, self.has_relative_attention_bias, name="layer_0")(
            x, mask, position_bias, deterministic, decode, rows_per_input)
    if self.is_decoder:
      x = _CrossAttentionLayer(cfg, name="layer_1")(x, encoded, encoder_mask, deterministic,
                                                    decode)
    x = _FeedForwardLayer(cfg, name="layer_2" if self.is_decoder else "layer_1")(x, deterministic)
    return x, position_bias


class _SelfAttentionLayer(nn.Module):
  config: T5Config
  causal: bool
  has_relative_attention_bias: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, position_bias: Array | None,
               deterministic: bool, decode: bool,
               rows_per_input: int = 1) -> tuple[Array, Array | None]:
    cfg = self.config
    normed = _layer_norm(cfg, "layer_norm")(x)
    out, position_bias = T5Attention(cfg, self.causal, self.has_relative_attention_bias,
                                     name="SelfAttention")(
        normed, mask=mask, position_bias=position_bias, deterministic=deterministic,
        decode=decode, rows_per_input=rows_per_input)
    return x + Dropout(cfg.dropout_rate)(out, deterministic=deterministic), position_bias


class _CrossAttentionLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, encoded: Array, encoder_mask: Array, deterministic: bool,
               decode: bool) -> Array:
    cfg = self.config
    normed = _layer_norm(cfg, "layer_norm")(x)
    out, _ = T5Attention(cfg, name="EncDecAttention")(
        normed, kv_source=encoded, mask=encoder_mask, deterministic=deterministic, decode=decode)
    return x + Dropout(cfg.dropout_rate)(out, deterministic=deterministic)


class _FeedForwardLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    normed = _layer_norm(cfg, "layer_norm")(x)
    out = T5DenseReluDense(cfg, name="DenseReluDense")(normed, deterministic)
    return x + Dropout(cfg.dropout_rate)(out, deterministic=deterministic)


class T5Stack(nn.Module):
  """The encoder or the decoder: embedding dropout, blocks, final layer norm and dropout."""
  config: T5Config
  is_decoder: bool

  @nn.compact
  def __call__(self, embedded: Array, mask: Array | None, encoded: Array | None = None,
               encoder_mask: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
    cfg = self.config
    num_layers = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    x = Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
    position_bias = None  # Computed by the first block, shared by the others.
    for i in range(num_layers):
      x, position_bias = T5Block(cfg, self.is_decoder, has_relative_attention_bias=i == 0,
                                 name=f"block_{i}")(
          x, mask, position_bias, encoded, encoder_mask, deterministic, decode)
    x = _layer_norm(cfg, "final_layer_norm")(x)
    return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class LMHead(nn.Module):
  """The untied output projection; logits accumulate in float32."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    kernel = self.param("kernel", _normal_init(cfg, "lm_head"), (cfg.d_model, cfg.vocab_size),
                        jnp.float32)
    return matmul(x, kernel.astype(cfg.dtype), 0, jnp.float32)


class T5(nn.Module):
  """T5 encoder-decoder with a language-modelling head, as T5ForConditionalGeneration."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model,
                           embedding_init=_normal_init(cfg, "shared"), dtype=cfg.dtype)
    self.encoder = T5Stack(cfg, is_decoder=False)
    self.decoder = T5Stack(cfg, is_decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg)

  def __call__(self, input_ids: Array, attention_mask: Array, decoder_input_ids: Array,
               decoder_attention_mask: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
    """Logits [batch, target_length, vocab] in float32 (teacher forcing)."""
    encoded = self.encode(input_ids, attention_mask, deterministic=deterministic)
    return self.decode(encoded, attention_mask, decoder_input_ids, decoder_attention_mask,
                       deterministic=deterministic, decode=decode)

  def encode(self, input_ids: Array, attention_mask: Array, deterministic: bool = True) -> Array:
    """Encoder hidden states [batch, source_length, d_model] in the compute dtype."""
    mask = attention_mask[:, None, None, :].astype(bool)
    return self.encoder(self.shared(input_ids), mask, deterministic=deterministic)

  def decode(self, encoded: Array, attention_mask: Array, decoder_input_ids: Array,
             decoder_attention_mask: Array | None = None, deterministic: bool = True,
             decode: bool = False, output_embedding: Array | None = None) -> Array:
    """Decoder logits in float32.

    `output_embedding` is `output_embedding_matrix(config, params)`, passed by a decoding loop that
    computes it once per call: as the first operand of the logits matmul, [vocab, d_model],
    XLA's CPU matmul reads it in place, where it repacked a [d_model, vocab] operand at every
    step (the tied embedding is used as it is; an untied head is transposed once).

    With `decode=True` and no 'cache' yet, creates the cache (sized by decoder_input_ids'
    length, holding the encoder keys/values of `encoded`) and returns full-sequence logits;
    with the cache present, decodes one token [batch, 1] and returns logits [batch, 1, vocab].
    Build the cache with `init_decode_cache` from the real encoder output: a cache made by
    `model.init` on dummy inputs holds the dummy's encoder keys/values.
    """
    cfg = self.config
    length = decoder_input_ids.shape[1]
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if decoder_attention_mask is not None:
      mask = mask & decoder_attention_mask[:, None, None, :].astype(bool)
    encoder_mask = attention_mask[:, None, None, :].astype(bool)
    x = self.decoder(self.shared(decoder_input_ids), mask, encoded, encoder_mask,
                     deterministic=deterministic, decode=decode)
    if cfg.tie_word_embeddings:
      x = x * jnp.asarray(cfg.d_model**-0.5, x.dtype)
    if output_embedding is not None:
      logits = jnp.einsum("vd,btd->vbt", output_embedding.astype(cfg.dtype), x,
                          preferred_element_type=jnp.float32)
      return jnp.transpose(logits, (1, 2, 0))
    if cfg.tie_word_embeddings:
      return matmul(x, self.shared.embedding.astype(cfg.dtype), 1, jnp.float32)
    return self.lm_head(x)


def output_embedding_matrix(config: T5Config, params: Any) -> Array:
  """The [vocab, d_model] matrix whose rows map the decoder output to logits: the shared
  embedding when tied (the output is scaled by d_model**-0.5 first), else the LM head's
  kernel transposed."""
  if config.tie_word_embeddings:
    return params["shared"]["embedding"]
  return jnp.transpose(params["lm_head"]["kernel"])


@functools.partial(jax.jit, static_argnums=1)
def _standard_normal(rng: Array, size: int) -> Array:
  return jax.random.normal(rng, (size,), jnp.float32)


def init_params(config: T5Config, rng: Array) -> Any:
  """Freshly initialised float32 parameters with Hugging Face's T5 init statistics.

  Equivalent to `T5(config).init(...)["params"]` in distribution, but draws every weight from
  one normal sample scaled by `init_stddev`: XLA compiles one random-number kernel instead of
  one per weight, which takes seconds on CPU. Call it outside `jax.jit`.
  """
  dummy = jnp.ones((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: T5(config).init(rng, dummy, dummy, dummy)["params"])
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  is_scale = [path[-1].key == "scale" for path, _ in leaves]
  sizes = [0 if scale else math.prod(leaf.shape) for scale, (_, leaf) in zip(is_scale, leaves)]
  flat = np.asarray(_standard_normal(rng, sum(sizes)))
  values, offset = [], 0
  for scale, (path, leaf), size in zip(is_scale, leaves, sizes):
    if scale:
      values.append(np.full(leaf.shape, config.initializer_factor, np.float32))
    else:
      stddev = np.float32(init_stddev(config, path[-2].key))
      values.append(flat[offset:offset + size].reshape(leaf.shape) * stddev)
      offset += size
  return jax.device_put(jax.tree_util.tree_unflatten(treedef, values))


def init_decode_cache(model: T5, params: Any, encoded: Array, attention_mask: Array,
                      max_length: int, rows_per_input: int = 1) -> Any:
  """The 'cache' collection for decoding up to `max_length` tokens after the start token.

  The cache holds the encoder keys/values of `encoded` once per input and decoder self-attention
  room for `rows_per_input` rows per input (the beams; row b * rows_per_input + i decodes for
  input b). Build it from the real encoder output: it runs a full-length decoder pass whose
  logits are discarded, and under `jax.jit` only the encoder key/value projections survive
  dead-code elimination.
  """
  rows = encoded.shape[0] * rows_per_input
  dummy_ids = jnp.zeros((rows, max_length), jnp.int32)
  _, variables = model.apply({"params": params}, encoded, attention_mask, dummy_ids,
                             decode=True, mutable=["cache"], method=T5.decode)
  return variables["cache"]
