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


def test_peak_flops_on_cpu_is_the_measured_matmul_rate_shared_by_devices():
  peak, source = perf.peak_flops_per_device(jax.devices()[0])
  assert source == "measured float32 matmul rate of this CPU"
  assert peak == pytest.approx(perf.measured_matmul_flops() / jax.local_device_count())
  assert peak > 1e8
