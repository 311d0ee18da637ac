"""Small builders shared by several test files (import as `helpers`)."""

import numpy as np
import safetensors.numpy

from flax_sum.model import T5Config

# A Hugging Face config.json of a T5 small enough for end-to-end runs in seconds.
TINY_T5_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": 32128,
    "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_decoder_layers": 1,
    "num_heads": 2, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
    "dropout_rate": 0.1, "feed_forward_proj": "relu", "pad_token_id": 0, "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


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


def read_event_files(runs_dir):
  """Every tensorboard Event in `runs_dir`'s event files, file by file in name order.

  A minimal TFRecord reader (8-byte length, 4-byte crc, data, 4-byte crc) with the protobufs
  that tensorboardX bundles, so the tests need no tensorboard.
  """
  import pathlib
  import struct

  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c

  events = []
  for path in sorted(pathlib.Path(runs_dir).glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      header = data[offset:offset + 8]
      (length,) = struct.unpack("<Q", header)
      (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
      payload = data[offset + 12:offset + 12 + length]
      (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
      assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), (
          f"{path}: bad record at byte {offset}")
      events.append(event_pb2.Event.FromString(payload))
      offset += 16 + length
  return events


def tensorboard_scalars(runs_dir):
  """{tag: [(step, value), ...]} of the scalars in `runs_dir`, in the order written."""
  scalars = {}
  for event in read_event_files(runs_dir):
    for value in event.summary.value:
      if value.WhichOneof("value") == "simple_value":
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def tensorboard_texts(runs_dir):
  """{tag: [text, ...]} of the text summaries in `runs_dir`."""
  texts = {}
  for event in read_event_files(runs_dir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == "text":
        texts.setdefault(value.tag, []).append(value.tensor.string_val[0].decode())
  return texts
