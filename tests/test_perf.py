"""Model FLOPs against XLA's own count, and the peak used for MFU."""

import jax
import jax.numpy as jnp
import pytest

from flax_sum import perf
from flax_sum.model import T5, T5Config, init_params


def _xla_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_model_flops_agree_with_xla_cost_analysis(feed_forward_proj):
  config = T5Config(vocab_size=3000, d_model=128, d_kv=32, d_ff=512, num_layers=2,
                    num_decoder_layers=3, num_heads=4, feed_forward_proj=feed_forward_proj,
                    tie_word_embeddings=False)
  params = init_params(config, jax.random.key(0))
  model = T5(config)
  batch, source_length, target_length = 2, 96, 24
  ids = jnp.ones((batch, source_length), jnp.int32)
  decoder_ids = jnp.ones((batch, target_length), jnp.int32)
  forward = lambda p: model.apply({"params": p}, ids, ids, decoder_ids, decoder_ids).sum()

  # XLA also counts element-wise work (softmax, norms), a few percent at this size.
  forward_ratio = (_xla_flops(forward, params) / batch
                   / perf.forward_flops_per_example(config, source_length, target_length))
  train_ratio = (_xla_flops(jax.grad(forward), params) / batch
                 / perf.train_flops_per_example(config, source_length, target_length))
  assert 0.97 < forward_ratio < 1.05
  assert 0.95 < train_ratio < 1.05


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_matmuls_only_programs_do_the_model_matmuls_and_little_else(feed_forward_proj):
  config = T5Config(vocab_size=3000, d_model=128, d_kv=32, d_ff=512, num_layers=2,
                    num_decoder_layers=3, num_heads=4, feed_forward_proj=feed_forward_proj,
                    tie_word_embeddings=False)
  batch, source_length, target_length, beams, cache_length = 2, 96, 24, 4, 10
  program_flops = lambda program: _xla_flops(program.fn, *program.args)

  train = perf.matmuls_only_train_step(config, batch, source_length, target_length)
  assert program_flops(train) == pytest.approx(
      batch * perf.train_flops_per_example(config, source_length, target_length), rel=0.01)

  d, inner = config.d_model, config.num_heads * config.d_kv
  feed_forward = (3 if config.is_gated_act else 2) * d * config.d_ff
  # Per beam and decoder layer: q, k, v, o and cross-attention's q, o; the attention over the
  # cache and over the source; the feed-forward block. Then the output layer.
  step_flops = 2 * batch * beams * (
      config.num_decoder_layers * (6 * d * inner + 2 * cache_length * inner + 2 * source_length * inner + feed_forward)
      + d * config.vocab_size)
  step = perf.matmuls_only_decoding_step(config, batch, beams, source_length, cache_length)
  assert program_flops(step) == pytest.approx(step_flops, rel=0.01)
  # XLA counts a loop's body once: the encoder, the cross-attention keys/values, one step.
  encoder_flops = 2 * batch * source_length * (
      config.num_layers * (4 * d * inner + 2 * source_length * inner + feed_forward)
      + config.num_decoder_layers * 2 * d * inner)
  generate = perf.matmuls_only_generate(config, batch, source_length, beams, cache_length)
  assert program_flops(generate) == pytest.approx(encoder_flops + step_flops, rel=0.01)


def test_peak_flops_on_cpu_is_the_measured_matmul_rate_shared_by_devices():
  peak, source = perf.peak_flops_per_device(jax.devices()[0])
  assert source == "measured float32 matmul rate of this CPU"
  assert peak == pytest.approx(perf.measured_matmul_flops() / jax.local_device_count())
  assert peak > 1e8


def test_throughput_rates_count_real_tokens_and_leave_out_paused_time(monkeypatch):
  clock = iter([0.0, 10.0, 14.0, 16.0, 16.0, 20.0, 20.0, 30.0])  # time.perf_counter calls.
  monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock))
  config = T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
  batch = {"input_ids": jnp.zeros((2, 3, 16)), "labels": jnp.zeros((2, 3, 8)),
           "attention_mask": jnp.ones((2, 3, 16)).at[:, :, 10:].set(0),
           "decoder_attention_mask": jnp.ones((2, 3, 8)).at[:, :, 4:].set(0)}
  flops_per_step = 6 * 2 * perf.train_flops_per_example(config, 16, 8)  # 2 processes.
  throughput = perf.Throughput(config, peak_flops_per_second=1e9, process_count=2)  # t=0
  throughput.add(batch)
  throughput.add(batch)
  throughput.pause()  # t=10: evaluation from here...
  throughput.resume()  # t=14: ...to here is left out.
  rates = throughput.report()  # t=16, restarts at t=16: 12 s of steps.
  assert rates["examples_per_second"] == round(2 * 12 / 12, 3)
  assert rates["tokens_per_second"] == round(2 * 2 * 6 * (10 + 4) / 12, 1)
  assert rates["mfu"] == round(2 * flops_per_step / 12 / 1e9, 4)
  throughput.add(batch)
  second = throughput.report()  # t=20: 4 s.
  assert second["examples_per_second"] == round(12 / 4, 3)
  assert throughput.summary()["examples_per_second"] == round(36 / 16, 3)
  assert perf.Throughput(config, 0.0).summary()["mfu"] is None
