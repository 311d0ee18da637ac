"""train_step / eval_step on a tiny T5 over the 8 simulated devices."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils

from flax_sum import config as config_lib
from flax_sum import input_pipeline
from flax_sum import metrics as metrics_lib
from flax_sum import steps
from flax_sum.model import T5, T5Config, init_params

VOCAB = 64


def tiny_config(dropout_rate=0.0, **overrides):
  return T5Config.from_hf_dict({
      "vocab_size": VOCAB, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2,
      "num_decoder_layers": 2, "num_heads": 2, "relative_attention_num_buckets": 8,
      "relative_attention_max_distance": 16, "dropout_rate": dropout_rate,
      "feed_forward_proj": "relu", "pad_token_id": 0, "eos_token_id": 1,
      "decoder_start_token_id": 0, **overrides})


def random_examples(n, seed=0, source_length=10, target_length=6):
  """A tokenized split: variable-length rows of ids in [2, VOCAB) ending with EOS."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    source = list(rng.integers(2, VOCAB, rng.integers(3, source_length))) + [1]
    target = list(rng.integers(2, VOCAB, rng.integers(2, target_length))) + [1]
    rows.append({"input_ids": source, "labels": target, "example_index": i})
  return rows


def batches_of(examples, *, per_device, num_devices, source_length=10, target_length=6):
  return list(input_pipeline.eval_batches(
      examples, per_device_batch_size=per_device, num_devices=num_devices,
      max_source_length=source_length, max_target_length=target_length))


def make_state(model_config, tx=None):
  params = init_params(model_config, jax.random.PRNGKey(0))
  return steps.TrainState.create(apply_fn=T5(model_config).apply, params=params,
                                 tx=tx or optax.adam(1e-2))


def test_cross_entropy_sums_matches_a_hand_computation_with_label_smoothing():
  logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
  labels = jnp.array([[0, 2]])
  weights = jnp.array([[1, 0]])
  log_probs = jax.nn.log_softmax(logits)
  expected = 0.9 * -log_probs[0, 0, 0] + 0.1 * -log_probs[0, 0].mean()
  loss_sum, token_sum = steps.cross_entropy_sums(logits, labels, weights, label_smoothing=0.1)
  np.testing.assert_allclose(loss_sum, expected, rtol=1e-6)
  assert token_sum == 1.0


def test_train_step_on_8_devices_changes_params_and_lowers_loss():
  assert jax.local_device_count() == 8
  model_config = tiny_config()
  state = make_state(model_config)
  initial_params = state.params
  p_train_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=lambda step: 1e-2),
      axis_name=steps.AXIS, in_axes=(0, 0, None))
  batch = batches_of(random_examples(16), per_device=2, num_devices=8)[0]
  state = jax_utils.replicate(state)
  losses = []
  for _ in range(5):
    state, metrics = p_train_step(state, batch, jax.random.PRNGKey(1))
    metrics = jax.tree.map(lambda x: float(x[0]), metrics)
    losses.append(metrics["loss"] / metrics["denominator"])
  params = jax.tree.map(lambda x: np.asarray(x[0]), state.params)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), initial_params, params)
  assert all(jax.tree.leaves(changed))
  assert losses[-1] < losses[0] - 0.1
  assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
  # Replicas stay identical: the gradients were reduced across devices.
  for leaf in jax.tree.leaves(state.params):
    np.testing.assert_array_equal(leaf[0], leaf[7])


def _one_update(examples, *, num_devices, per_device, accumulation_steps):
  # Plain SGD, so the params compare the gradients themselves (Adam's first step is ~sign(g)).
  model_config = tiny_config()
  state = jax_utils.replicate(make_state(model_config, optax.sgd(1.0)),
                              devices=jax.local_devices()[:num_devices])
  p_train_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=lambda step: 1e-2,
                        accumulation_steps=accumulation_steps),
      axis_name=steps.AXIS, in_axes=(0, 0, None), devices=jax.local_devices()[:num_devices])
  batch = batches_of(examples, per_device=per_device * accumulation_steps,
                     num_devices=num_devices)[0]
  state, metrics = p_train_step(state, batch, jax.random.PRNGKey(1))
  return (jax.tree.map(lambda x: np.asarray(x[0]), state.params),
          jax.tree.map(lambda x: float(x[0]), metrics))


def test_the_update_is_the_same_for_any_device_count_and_accumulation():
  examples = random_examples(16, seed=3)
  reference, reference_metrics = _one_update(examples, num_devices=1, per_device=16,
                                             accumulation_steps=1)
  for num_devices, per_device, accumulation in ((8, 2, 1), (2, 4, 2), (1, 4, 4)):
    params, metrics = _one_update(examples, num_devices=num_devices, per_device=per_device,
                                  accumulation_steps=accumulation)
    np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=1e-5)
    assert metrics["denominator"] == reference_metrics["denominator"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
      np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("per_device", [1, 3])
def test_eval_loss_is_the_token_weighted_mean_for_any_batch_size_and_device_count(
    num_devices, per_device):
  model_config = tiny_config()
  params = init_params(model_config, jax.random.PRNGKey(0))
  examples = random_examples(13, seed=5)
  devices = jax.local_devices()[:num_devices]
  p_eval_step = jax.pmap(functools.partial(steps.eval_step, apply_fn=T5(model_config).apply),
                         axis_name=steps.AXIS, devices=devices)
  replicated = jax_utils.replicate(params, devices=devices)
  totals = None
  for batch in batches_of(examples, per_device=per_device, num_devices=num_devices):
    totals = metrics_lib.accumulate(
        totals, jax.tree.map(lambda x: x.addressable_shards[0].data, p_eval_step(replicated, batch)))

  # The reference: each example alone, unbatched, summed by hand.
  model = T5(model_config)
  loss_sum = token_sum = 0.0
  for example in examples:
    batch = batches_of([example], per_device=1, num_devices=1)[0]
    batch = jax.tree.map(lambda x: x[0], batch)
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["decoder_input_ids"], batch["decoder_attention_mask"])
    log_probs = jax.nn.log_softmax(logits)
    for position, label in enumerate(example["labels"]):
      loss_sum -= float(log_probs[0, position, label])
      token_sum += 1
  assert totals["denominator"] == token_sum == sum(len(e["labels"]) for e in examples)
  np.testing.assert_allclose(metrics_lib.finalize(totals)["loss"], loss_sum / token_sum,
                             rtol=1e-6)


def test_a_batch_cut_to_its_length_bucket_has_the_same_loss_and_gradients():
  model_config = tiny_config()
  examples = random_examples(8, seed=3, source_length=30, target_length=12)
  arrays = input_pipeline._as_arrays(examples, 40, 24)
  buckets = input_pipeline.LengthBuckets.evenly_spaced(40, 24, 4)
  layout = {"seed": 0, "epoch": 0, "per_device_batch_size": 8, "num_devices": 1}
  padded = next(input_pipeline.train_batches(arrays, **layout))
  cut = next(input_pipeline.train_batches(arrays, buckets=buckets, **layout))
  assert cut["input_ids"].shape[-1] == 32 and cut["labels"].shape[-1] == 16
  state = make_state(model_config)

  def loss_and_grads(batch):
    batch = jax.tree.map(lambda x: x[0], batch)
    def loss(params):
      logits = T5(model_config).apply(
          {"params": params}, batch["input_ids"], batch["attention_mask"],
          batch["decoder_input_ids"], batch["decoder_attention_mask"])
      return steps.cross_entropy_sums(logits, batch["labels"], batch["decoder_attention_mask"])[0]
    return jax.value_and_grad(loss)(state.params)

  (padded_loss, padded_grads), (cut_loss, cut_grads) = loss_and_grads(padded), loss_and_grads(cut)
  np.testing.assert_allclose(cut_loss, padded_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               cut_grads, padded_grads)


def _train_losses(model_config, param_dtype, num_steps=12, accumulation_steps=1):
  """Per-step losses and the final state of 8-device training on fixed batches."""
  params = init_params(model_config, jax.random.PRNGKey(0))
  state = steps.TrainState.create(apply_fn=T5(model_config).apply, params=params,
                                  tx=optax.adamw(3e-3), param_dtype=param_dtype)
  p_train_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=lambda step: 3e-3,
                        accumulation_steps=accumulation_steps),
      axis_name=steps.AXIS, in_axes=(0, 0, None))
  batches = batches_of(random_examples(64, seed=7), per_device=2 * accumulation_steps,
                       num_devices=8)
  state, losses = jax_utils.replicate(state), []
  for step in range(num_steps):
    state, metrics = p_train_step(state, batches[step % len(batches)], jax.random.PRNGKey(1))
    metrics = jax.tree.map(lambda x: float(x[0]), metrics)
    losses.append(metrics["loss"] / metrics["denominator"])
  return np.array(losses), jax.tree.map(lambda x: x[0], state)


def test_bfloat16_training_keeps_float32_master_weights_and_tracks_float32_losses():
  reference, _ = _train_losses(tiny_config(), jnp.float32, accumulation_steps=2)
  model_config = dataclasses.replace(tiny_config(), dtype=jnp.bfloat16)
  losses, state = _train_losses(model_config, jnp.bfloat16, accumulation_steps=2)
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
  assert {leaf.dtype for leaf in jax.tree.leaves(state.master_params)} == {jnp.dtype(jnp.float32)}
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(p, m.astype(jnp.bfloat16)),
               state.params, state.master_params)
  assert state.float32_params() is state.master_params
  # Same data and init: bfloat16 (8 mantissa bits) follows the float32 run to within 2%, and
  # both learn.
  np.testing.assert_allclose(losses, reference, rtol=0.02)
  assert losses[-1] < losses[0] - 0.3


def test_replicated_state_is_laid_out_like_step_outputs():
  # A different layout (sharding) of the inputs would compile the step a second time.
  p_train_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=lambda step: 1e-2),
      axis_name=steps.AXIS, in_axes=(0, 0, None))
  batch = batches_of(random_examples(16), per_device=2, num_devices=8)[0]
  state = steps.replicate(make_state(tiny_config()))
  layouts = [leaf.sharding for leaf in jax.tree.leaves(state)]
  state, _ = p_train_step(state, batch, jax.random.PRNGKey(1))
  assert [leaf.sharding for leaf in jax.tree.leaves(state)] == layouts
  assert layouts[0] != jax_utils.replicate(np.zeros(1)).sharding  # What the fix avoids.


def _state_sized_copies(compiled_hlo, state):
  """The copies in a compiled pmapped step whose shape is a train-state leaf's on one device."""
  leaf_shapes = {"f32[%s]" % ",".join(map(str, (1,) + leaf.shape[1:]))
                 for leaf in jax.tree.leaves(state) if leaf.ndim > 1}
  copied = re.findall(r"= (f32\[[\d,]*\])\{[\d,]*\} copy\(", compiled_hlo)
  return [shape for shape in copied if shape in leaf_shapes]


def test_the_cpu_train_step_keeps_its_input_state_and_copies_none_of_it():
  # Donated, the state was updated in place at the cost of copying it twice per step.
  assert jax.default_backend() == "cpu" and not steps.donates_train_state()
  batch = batches_of(random_examples(16), per_device=2, num_devices=8)[0]
  state = steps.replicate(make_state(tiny_config()))
  p_train_step = steps.pmap_train_step(lambda step: 1e-2, config_lib.base_config())
  new_state, _ = p_train_step(state, batch, jax.random.PRNGKey(1))
  for old, new in zip(jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)):
    assert not np.array_equal(np.asarray(old), np.asarray(new))  # Old buffers still readable.
  step_hlo = p_train_step.lower(state, batch, jax.random.PRNGKey(1)).compile().as_text()
  assert _state_sized_copies(step_hlo, state) == []
  donating_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=lambda step: 1e-2),
      axis_name=steps.AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
  donating_hlo = donating_step.lower(state, batch, jax.random.PRNGKey(1)).compile().as_text()
  assert len(_state_sized_copies(donating_hlo, state)) >= len(jax.tree.leaves(state.params))
