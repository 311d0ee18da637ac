"""Small builders shared by several test files (import as `helpers`)."""

import numpy as np
import safetensors.numpy

from flax_sum.model import T5Config


def tiny_t5_config(feed_forward_proj: str, tied: bool, *, vocab_size: int, d_model: int,
                   d_kv: int, d_ff: int) -> T5Config:
  # max_distance 10 is below the decoding lengths, so decoding reaches the logarithmic buckets.
  return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=2,
                  num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=10, feed_forward_proj=feed_forward_proj,
                  tie_word_embeddings=tied)


def padded_source_batch(batch: int, length: int, vocab_size: int, seed: int):
  """(input_ids, attention_mask) with right padding of varying length on every third row."""
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(2, vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones_like(input_ids)
  for row in range(0, batch, 3):
    mask[row, length - 1 - row % 5:] = 0
  return input_ids * mask, mask


def make_safetensors_fail(monkeypatch) -> None:
  """The next safetensors write leaves a partial file and raises OSError('disk full')."""
  def failing_save(tensors, path, metadata=None):
    with open(path, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")
  monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
