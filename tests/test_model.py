"""Tests for the Flax T5: config semantics, masks, causality, variants and initialisation."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_sum import config as config_lib
from flax_sum import model as model_lib
from flax_sum.errors import UserError
from flax_sum.model import (Dropout, T5, T5Config, add_position_bias, init_params,
                            relative_position_bucket)

VARIANTS = [("relu", True), ("gated-gelu", False), ("relu", False), ("gated-gelu", True)]


def tiny_config(feed_forward_proj: str = "relu", tie_word_embeddings: bool = True,
                **overrides) -> T5Config:
  fields = dict(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie_word_embeddings)
  fields.update(overrides)
  return T5Config(**fields)


@pytest.fixture(scope="module")
def relu_model():
  config = tiny_config()
  return T5(config), init_params(config, jax.random.key(0))


def random_batch(seed: int, batch: int = 3, source: int = 7, target: int = 5):
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(2, 100, (batch, source)).astype(np.int32)
  decoder_ids = rng.integers(2, 100, (batch, target)).astype(np.int32)
  return input_ids, np.ones_like(input_ids), decoder_ids


def test_config_hf_semantics():
  config = T5Config.from_pretrained_json(config_lib.ASSETS_DIR / "t5" / "t5-small-config.json")
  assert (config.d_model, config.num_layers, config.num_decoder_layers) == (512, 6, 6)
  assert config.tie_word_embeddings and not config.is_gated_act
  assert config.extra["task_specific_params"]["summarization"]["num_beams"] == 4
  assert "transformers_version" not in config.extra
  assert T5Config.from_hf_dict({"num_layers": 3}).num_decoder_layers == 3
  gated = T5Config.from_hf_dict({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
  assert gated.is_gated_act and gated.dense_act_fn == "gelu_new"
  assert not gated.tie_word_embeddings
  # transformers 5 writes tie_word_embeddings=true plus scale_decoder_outputs=false for v1.1.
  assert not T5Config.from_hf_dict({"tie_word_embeddings": True,
                                    "scale_decoder_outputs": False}).tie_word_embeddings
  assert T5Config(feed_forward_proj="gated-silu").dense_act_fn == "silu"
  assert T5Config(dtype="bfloat16").dtype == jnp.bfloat16
  with pytest.raises(UserError, match="feed_forward_proj"):
    T5Config(feed_forward_proj="gated-foo")
  with pytest.raises(UserError, match="model_type"):
    T5Config.from_hf_dict({"model_type": "bart"})


@pytest.mark.parametrize("key, value, expected", [
    ("d_model", "big", "a positive integer"),
    ("num_layers", 0, "a positive integer"),
    ("vocab_size", -3, "a positive integer"),
    ("num_heads", True, "a positive integer"),  # JSON's true is not a count.
    ("d_ff", 512.0, "a positive integer"),
    ("num_decoder_layers", "6", "a positive integer"),
    ("relative_attention_num_buckets", None, "a positive integer"),
    ("dropout_rate", "x", "a number in [0, 1)"),
    ("dropout_rate", 1.0, "a number in [0, 1)"),
    ("dropout_rate", -0.1, "a number in [0, 1)"),
    ("layer_norm_epsilon", 0, "a positive number"),
    ("layer_norm_epsilon", False, "a positive number"),
])
def test_config_values_of_the_wrong_type_or_range_are_one_line(key, value, expected):
  message = f"config.json: {key} must be {expected}, got {value!r}: fix the model's config.json"
  with pytest.raises(UserError) as raised:
    tiny_config(**{key: value})
  assert str(raised.value) == message
  # The same from a config.json, where a null means the default.
  if value is not None:
    with pytest.raises(UserError) as raised:
      T5Config.from_hf_dict({key: value})
    assert str(raised.value) == message


def test_config_values_in_range_are_accepted():
  config = T5Config.from_hf_dict({"dropout_rate": 0, "layer_norm_epsilon": 1e-6,
                                  "num_layers": np.int64(2), "d_model": 8, "num_heads": 1})
  assert (config.dropout_rate, config.num_decoder_layers) == (0, 2)
  with pytest.raises(UserError, match="feed_forward_proj 5 is not supported"):
    tiny_config(feed_forward_proj=5)


def test_relative_position_bucket_values():
  relative = jnp.array([0, -1, 1, -7, 7, -8, -200, 200, -127, 127])
  bidirectional = relative_position_bucket(relative, True, 32, 128)
  np.testing.assert_array_equal(bidirectional, [0, 1, 17, 7, 23, 8, 15, 31, 15, 31])
  unidirectional = relative_position_bucket(relative, False, 32, 128)
  np.testing.assert_array_equal(unidirectional, [0, 1, 0, 7, 0, 8, 31, 0, 31, 0])


def test_shapes_and_dtypes(relu_model):
  model, params = relu_model
  bf16_model = T5(dataclasses.replace(model.config, dtype=jnp.bfloat16))
  input_ids, mask, decoder_ids = random_batch(0)

  @jax.jit
  def run(params):
    outputs = {}
    for name, m in (("fp32", model), ("bf16", bf16_model)):
      outputs[name] = (m.apply({"params": params}, input_ids, mask, decoder_ids),
                       m.apply({"params": params}, input_ids, mask, method=T5.encode))
    return outputs

  outputs = run(params)
  logits, encoded = outputs["fp32"]
  assert logits.shape == (3, 5, 100) and logits.dtype == jnp.float32
  assert encoded.shape == (3, 7, 16) and encoded.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  bf16_logits, bf16_encoded = outputs["bf16"]
  assert bf16_logits.dtype == jnp.float32 and bf16_encoded.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16_logits, logits, atol=0.1)


def _dot_generals(hlo_text: str) -> list[tuple[list[list[str]], str]]:
  """([operand shapes and element types], result element type) of each dot_general in
  StableHLO text: a tensor<3x7x16xbf16> operand is ["3", "7", "16", "bf16"]."""
  return [([t.split("x") for t in re.findall(r"tensor<([^>]*)>", operands)],
           result.split("x")[-1])
          for operands, result in re.findall(
              r"stablehlo\.dot_general .*?: \((.*?)\) -> tensor<([^>]*)>", hlo_text)]


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_bfloat16_matmuls_on_cpus_accumulate_into_float32_forward_and_backward(
    tie_word_embeddings):
  # XLA's CPU backend runs bfloat16-output matmuls 2-6x slower than float32-output ones, so
  # every matmul of a bfloat16 model, in the loss and in its gradient, takes bfloat16 operands
  # and asks for a float32 result.
  assert jax.default_backend() == "cpu"
  config = tiny_config(tie_word_embeddings=tie_word_embeddings, dtype=jnp.bfloat16)
  model, params = T5(config), init_params(config, jax.random.key(0))
  input_ids, mask, decoder_ids = random_batch(0)

  def loss(params):
    logits = model.apply({"params": params}, input_ids, mask, decoder_ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  dots = _dot_generals(jax.jit(jax.grad(loss)).lower(params).as_text())
  assert [d for d in dots if d[1] == "bf16"] == []
  # The matmuls with a weight matrix (a rank-2 operand): per layer, 6 in the encoder (q, k, v,
  # o, wi, wo) and 10 in the decoder (two attentions), plus the LM head; each runs once
  # forward and twice backward (the input's and the weight's gradients).
  weight_matmuls = [(tuple(t[-1] for t in operands), result) for operands, result in dots
                    if any(len(t) == 3 for t in operands)]  # Two dimensions and the type.
  assert len(weight_matmuls) == 3 * (config.num_layers * (6 + 10) + 1)
  assert set(weight_matmuls) == {(("bf16", "bf16"), "f32")}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weight_gradients_do_not_transpose_activations_on_cpus(dtype):
  # A weight gradient contracting both the batch and the length axes made XLA's CPU backend
  # write its cotangent out feature-major ([features, batch, length]): a transposed copy of every
  # activation that enters a matmul, 0.33 s of a 3.4 s t5-small train step. Over rows, none.
  assert jax.default_backend() == "cpu"
  config = tiny_config(dtype=dtype)
  model, params = T5(config), init_params(config, jax.random.key(0))
  input_ids, mask, decoder_ids = random_batch(0)

  def loss(params):
    logits = model.apply({"params": params}, input_ids, mask, decoder_ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  def feature_major_copies(compiled_text: str, batch: int, lengths: set[int]) -> list[str]:
    shapes = re.findall(r"= \w+\[(\d+),(\d+),(\d+)\]\S* transpose\(.*?dimensions=\{2,0,1\}",
                        compiled_text)
    return [s for s in shapes if int(s[1]) == batch and int(s[2]) in lengths]

  compiled = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert feature_major_copies(compiled, 3, {7, 5}) == []
  # The check sees such a copy: differentiating one [batch, length, K] dot_general makes it.
  x, w = jnp.ones((3, 7, 16), dtype), jnp.ones((16, 32), dtype)
  direct = jax.jit(jax.grad(lambda w: jnp.sum(jax.lax.dot_general(
      x, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32) ** 2)))
  assert feature_major_copies(direct.lower(w).compile().as_text(), 3, {7}) != []


@pytest.mark.parametrize("w_contracting", [0, 1])
def test_the_float32_accumulated_matmul_and_its_gradients_match_float32_math(w_contracting):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.bfloat16)
  w_shape = (64, 40) if w_contracting == 0 else (40, 64)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.bfloat16)
  grad = jnp.asarray(rng.normal(size=(2, 3, 40)), jnp.bfloat16)
  as32 = lambda t: np.asarray(t, np.float32)
  w32 = as32(w) if w_contracting == 0 else as32(w).T

  out, vjp = jax.vjp(lambda x, w: model_lib.matmul(x, w, w_contracting, jnp.bfloat16), x, w)
  dx, dw = vjp(grad)
  assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits: each result is the float32 one, rounded.
  np.testing.assert_allclose(as32(out), as32(x) @ w32, rtol=2**-8, atol=1e-3)
  np.testing.assert_allclose(as32(dx), as32(grad) @ w32.T, rtol=2**-8, atol=1e-3)
  expected_dw = as32(x).reshape(-1, 64).T @ as32(grad).reshape(-1, 40)
  np.testing.assert_allclose(as32(dw), expected_dw if w_contracting == 0 else expected_dw.T,
                             rtol=2**-8, atol=1e-3)
  # float32 operands take plain float32 matmuls.
  x32, w32_operand = jnp.asarray(as32(x)), jnp.asarray(as32(w))
  np.testing.assert_array_equal(
      model_lib.matmul(x32, w32_operand, w_contracting, jnp.float32),
      jax.lax.dot_general(x32, w32_operand, (((2,), (w_contracting,)), ((), ()))))


def test_encoder_padding_does_not_change_real_tokens(relu_model):
  model, params = relu_model
  input_ids, mask, decoder_ids = random_batch(1)
  padded_ids = np.concatenate([input_ids, np.full((3, 4), 57, np.int32)], axis=1)
  padded_mask = np.concatenate([mask, np.zeros((3, 4), np.int32)], axis=1)
  padded_mask[0, 7:] = 1  # Row 0 really is longer; rows 1 and 2 only gained padding.
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, input_ids, mask, decoder_ids)
  padded_logits = apply({"params": params}, padded_ids, padded_mask, decoder_ids)
  np.testing.assert_allclose(padded_logits[1:], logits[1:], atol=1e-5)
  assert np.abs(padded_logits[0] - logits[0]).max() > 1e-3

  encode = jax.jit(lambda ids, m: model.apply({"params": params}, ids, m, method=T5.encode))
  encoded = encode(input_ids, mask)
  padded_encoded = encode(padded_ids, padded_mask)
  np.testing.assert_allclose(padded_encoded[1:, :7], encoded[1:], atol=1e-5)


def test_decoder_is_causal(relu_model):
  model, params = relu_model
  input_ids, mask, decoder_ids = random_batch(2)
  changed = decoder_ids.copy()
  changed[:, 3] = (changed[:, 3] + 1) % 100
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, input_ids, mask, decoder_ids)
  changed_logits = apply({"params": params}, input_ids, mask, changed)
  np.testing.assert_array_equal(changed_logits[:, :3], logits[:, :3])
  assert np.abs(changed_logits[:, 3:] - logits[:, 3:]).min(axis=-1).max() > 0


def test_decoder_attention_mask_hides_padded_targets(relu_model):
  model, params = relu_model
  input_ids, mask, decoder_ids = random_batch(3)
  decoder_mask = np.ones_like(decoder_ids)
  decoder_mask[:, 3:] = 0
  changed = decoder_ids.copy()
  changed[:, 3:] = 9
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, input_ids, mask, decoder_ids, decoder_mask)
  changed_logits = apply({"params": params}, input_ids, mask, changed, decoder_mask)
  np.testing.assert_allclose(changed_logits[:, :3], logits[:, :3], atol=1e-6)


@pytest.mark.parametrize("feed_forward_proj,tied", VARIANTS)
def test_variants_run(feed_forward_proj, tied):
  config = tiny_config(feed_forward_proj, tied, num_decoder_layers=3)
  params = init_params(config, jax.random.key(1))
  ff = params["encoder"]["block_0"]["layer_1"]["DenseReluDense"]
  assert set(ff) == ({"wi_0", "wi_1", "wo"} if config.is_gated_act else {"wi", "wo"})
  assert ("lm_head" in params) == (not tied)
  assert set(params["decoder"]) == {"block_0", "block_1", "block_2", "final_layer_norm"}
  assert "relative_attention_bias" not in params["decoder"]["block_1"]["layer_0"]["SelfAttention"]
  input_ids, mask, decoder_ids = random_batch(4)
  logits = jax.jit(T5(config).apply)({"params": params}, input_ids, mask, decoder_ids)
  assert logits.shape == (3, 5, 100) and np.isfinite(logits).all()


def test_dropout_only_in_training(relu_model):
  model, params = relu_model
  input_ids, mask, decoder_ids = random_batch(5)

  @jax.jit
  def run(dropout_rng):
    train = model.apply({"params": params}, input_ids, mask, decoder_ids, deterministic=False,
                        rngs={"dropout": dropout_rng})
    return train, model.apply({"params": params}, input_ids, mask, decoder_ids)

  # An rbg key only to keep compilation fast on CPU.
  train_0, eval_logits = run(jax.random.key(0, impl="unsafe_rbg"))
  train_1, _ = run(jax.random.key(1, impl="unsafe_rbg"))
  assert np.abs(train_0 - train_1).max() > 1e-3
  assert np.abs(train_0 - eval_logits).max() > 1e-3
  np.testing.assert_array_equal(run(jax.random.key(0, impl="unsafe_rbg"))[0], train_0)


def test_layer_norm_params_are_named_layer_norm(relu_model):
  _, params = relu_model
  paths = ["/".join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  norm_paths = [p for p in paths if "layer_norm" in p]
  # 2 encoder blocks x 2 + 2 decoder blocks x 3 + 2 final norms.
  assert len(norm_paths) == 12 and all(p.endswith("scale") for p in norm_paths)
  assert "encoder/block_0/layer_0/SelfAttention/q/kernel" in paths
  assert "shared/embedding" in paths


def test_init_matches_hf_statistics():
  config = T5Config(vocab_size=300, d_model=256, d_kv=32, d_ff=512, num_layers=1, num_heads=8,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    initializer_factor=1.0)
  params = init_params(config, jax.random.key(2))
  block = params["encoder"]["block_0"]
  attention = block["layer_0"]["SelfAttention"]
  ff = block["layer_1"]["DenseReluDense"]
  expected = {
      "q": (attention["q"]["kernel"], (256 * 32)**-0.5),
      "k": (attention["k"]["kernel"], 256**-0.5),
      "v": (attention["v"]["kernel"], 256**-0.5),
      "o": (attention["o"]["kernel"], 256**-0.5),  # (num_heads * d_kv) ** -0.5
      "bias": (attention["relative_attention_bias"]["embedding"], 256**-0.5),
      "wi_0": (ff["wi_0"]["kernel"], 256**-0.5),
      "wi_1": (ff["wi_1"]["kernel"], 256**-0.5),
      "wo": (ff["wo"]["kernel"], 512**-0.5),
      "shared": (params["shared"]["embedding"], 1.0),
      "lm_head": (params["lm_head"]["kernel"], 1.0),
  }
  for name, (value, std) in expected.items():
    assert abs(float(np.std(value)) / std - 1) < 0.2, name
    assert abs(float(np.mean(value))) < 0.2 * std, name
  np.testing.assert_array_equal(block["layer_0"]["layer_norm"]["scale"], np.ones(256))
  # init_params draws in one sample; flax's own init must give the same tree of shapes.
  dummy = jnp.ones((1, 1), jnp.int32)
  flax_shapes = jax.eval_shape(T5(config).init, jax.random.key(0), dummy, dummy, dummy)["params"]
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), flax_shapes)
          == jax.tree.map(lambda x: (x.shape, x.dtype), params))
  np.testing.assert_array_equal(params["encoder"]["final_layer_norm"]["scale"], np.ones(256))
  assert attention["q"]["kernel"].shape == (256, 256)
  assert attention["relative_attention_bias"]["embedding"].shape == (32, 8)


def test_dropout_drops_at_the_rate_and_scales_the_rest():
  x = jnp.ones((64, 1024), jnp.float32)
  dropout = Dropout(0.1)
  apply = jax.jit(lambda key: dropout.apply({}, x, deterministic=False, rngs={"dropout": key}))
  out = np.asarray(apply(jax.random.key(0)))
  assert set(np.unique(out)) == {0.0, np.float32(1 / 0.9)}
  kept = (out > 0).mean()
  assert abs(kept - 0.9) < 0.005  # 65,536 draws: the standard error is 0.0012.
  np.testing.assert_array_equal(out, apply(jax.random.key(0)))  # Deterministic per key.
  other = np.asarray(apply(jax.random.key(1)))
  both_dropped = ((out == 0) & (other == 0)).mean()
  assert abs(both_dropped - 0.01) < 0.002  # Independent across keys.
  # Rows are not copies of each other (the mask hashes the element's flat index).
  assert not (out[0] == out[1]).all()
  np.testing.assert_array_equal(dropout.apply({}, x, deterministic=True), x)
  assert not Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}).any()


def test_dropout_masks_differ_between_layers_of_one_step():
  class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Dropout(0.5, name="first")(x, False), Dropout(0.5, name="second")(x, False)

  x = jnp.ones((16, 64), jnp.float32)
  first, second = TwoLayers().apply({}, x, rngs={"dropout": jax.random.key(0)})
  assert 0.4 < (np.asarray(first) > 0).mean() < 0.6
  # Independent masks disagree on half the elements (1,024 draws: standard error 0.016).
  assert 0.44 < ((np.asarray(first) > 0) != (np.asarray(second) > 0)).mean() < 0.56


@pytest.mark.parametrize("bias_shape", [(1, 2, 1, 3, 5), (4, 2, 1, 3, 5), (1, 2, 3, 3, 5)])
def test_position_bias_gradient_sums_over_the_axes_it_was_broadcast_over(bias_shape):
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.normal(size=(4, 2, 3, 3, 5)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  upstream = jnp.asarray(rng.normal(size=scores.shape), jnp.float32)
  ours = jax.grad(lambda s, b: jnp.sum(add_position_bias(s, b) * upstream), argnums=(0, 1))
  expected = (upstream, np.sum(np.asarray(upstream), axis=tuple(
      axis for axis, size in enumerate(bias_shape) if size == 1), keepdims=True))
  for got, want in zip(jax.jit(ours)(scores, bias), expected):
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(add_position_bias(scores, bias), scores + bias)
