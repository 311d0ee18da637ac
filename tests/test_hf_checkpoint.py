"""Hugging Face checkpoints: exact round trips, strict name checks, config.json compatibility."""

import dataclasses
import json
import os
import socket

import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers

import helpers
from flax_sum import config as config_lib
from flax_sum import hf_checkpoint
from flax_sum.errors import UserError
from flax_sum.model import T5Config, init_params

VARIANTS = {"relu-tied": ("relu", True), "gated-gelu-untied": ("gated-gelu", False)}


def tiny_config(feed_forward_proj: str = "relu", tied: bool = True, **extra) -> T5Config:
  return T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                  num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, feed_forward_proj=feed_forward_proj,
                  tie_word_embeddings=tied, extra=extra)


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request):
  config = tiny_config(*VARIANTS[request.param],
                       task_specific_params={"summarization": {"prefix": "summarize: "}})
  return config, init_params(config, jax.random.key(0))


def test_round_trip_is_exact(variant, tmp_path):
  config, params = variant
  hf_checkpoint.save_pretrained(str(tmp_path), config, params)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json",
                                          "model.safetensors"]
  umask = os.umask(0)
  os.umask(umask)
  # Temp files are private; the saved model gets the usual permissions.
  assert os.stat(tmp_path / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask
  loaded_config, loaded = hf_checkpoint.load_pretrained(str(tmp_path))
  assert loaded_config == config
  assert loaded_config.extra == dict(config.extra)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(restored, original)


def test_state_dict_names_and_layout(variant):
  config, params = variant
  tensors = hf_checkpoint.hf_state_dict_from_params(config, params)
  q = tensors["encoder.block.1.layer.0.SelfAttention.q.weight"]
  np.testing.assert_array_equal(
      q, np.asarray(params["encoder"]["block_1"]["layer_0"]["SelfAttention"]["q"]["kernel"]).T)
  assert q.flags["C_CONTIGUOUS"] and q.dtype == np.float32
  assert tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape \
      == (8, 4)
  assert "decoder.block.2.layer.1.EncDecAttention.o.weight" in tensors
  assert "decoder.final_layer_norm.weight" in tensors
  ff = "decoder.block.0.layer.2.DenseReluDense"
  if config.is_gated_act:
    assert f"{ff}.wi_0.weight" in tensors and f"{ff}.wi.weight" not in tensors
  else:
    assert f"{ff}.wi.weight" in tensors and f"{ff}.wi_0.weight" not in tensors
  assert ("lm_head.weight" in tensors) == (not config.tie_word_embeddings)
  assert "encoder.embed_tokens.weight" not in tensors
  # 1 shared + 2 encoder blocks x 8 (+1 bias) + 3 decoder blocks x 13 (+1 bias) + 2 final norms.
  ff_extra = 5 if config.is_gated_act else 0
  assert len(tensors) == (1 + 17 + 40 + 2 + ff_extra + (0 if config.tie_word_embeddings else 1))

  replicated = jax.tree.map(lambda x: np.broadcast_to(x, (8,) + x.shape), params)
  with pytest.raises(ValueError, match="unreplicate"):
    hf_checkpoint.hf_state_dict_from_params(config, replicated)


def test_missing_and_unexpected_tensors_are_named():
  config = tiny_config()
  tensors = hf_checkpoint.hf_state_dict_from_params(config, init_params(config, jax.random.key(1)))
  missing = dict(tensors)
  del missing["decoder.block.1.layer.1.EncDecAttention.k.weight"]
  with pytest.raises(UserError, match=r"missing tensors: decoder\.block\.1\.layer\.1\."
                                      r"EncDecAttention\.k\.weight$"):
    hf_checkpoint.params_from_hf_state_dict(config, missing)

  extra = dict(tensors, **{"encoder.block.7.layer.0.SelfAttention.q.weight": np.zeros((16, 16))})
  with pytest.raises(UserError, match=r"unexpected tensors: encoder\.block\.7\.layer\.0\."
                                      r"SelfAttention\.q\.weight$"):
    hf_checkpoint.params_from_hf_state_dict(config, extra)

  wrong = dict(tensors, **{"shared.weight": np.zeros((99, 16), np.float32)})
  with pytest.raises(UserError, match=r"wrong shapes: shared\.weight \(99, 16\)"):
    hf_checkpoint.params_from_hf_state_dict(config, wrong)

  # A gated checkpoint read with a relu config: long lists are abbreviated on one line.
  gated = tiny_config("gated-gelu")
  gated_tensors = hf_checkpoint.hf_state_dict_from_params(gated, init_params(gated,
                                                                             jax.random.key(1)))
  with pytest.raises(UserError) as error:
    hf_checkpoint.params_from_hf_state_dict(config, gated_tensors)
  message = str(error.value)
  assert "\n" not in message and "(and 5 more)" in message
  assert "DenseReluDense.wi.weight" in message and "DenseReluDense.wi_0.weight" in message


def test_tied_aliases_are_accepted():
  config = tiny_config()
  params = init_params(config, jax.random.key(2))
  tensors = hf_checkpoint.hf_state_dict_from_params(config, params)
  shared = tensors.pop("shared.weight")
  tensors.update({
      "encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared,
      "lm_head.weight": shared,
      "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
          np.zeros((8, 4), np.float32),
  })
  loaded = hf_checkpoint.params_from_hf_state_dict(config, tensors)
  np.testing.assert_array_equal(loaded["shared"]["embedding"], params["shared"]["embedding"])

  tensors["lm_head.weight"] = shared + 1
  with pytest.raises(UserError, match="tie_word_embeddings"):
    hf_checkpoint.params_from_hf_state_dict(config, tensors)


def test_config_json_reads_back_in_transformers(variant, tmp_path):
  config, params = variant
  hf_checkpoint.save_pretrained(str(tmp_path), config, params)
  hf_config = transformers.T5Config.from_pretrained(str(tmp_path))
  for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
                "dropout_rate", "layer_norm_epsilon", "feed_forward_proj", "pad_token_id",
                "eos_token_id", "decoder_start_token_id", "initializer_factor", "is_gated_act",
                "dense_act_fn"):
    assert getattr(hf_config, field) == getattr(config, field), field
  # transformers 5 always ties and records the v1.1 head as scale_decoder_outputs=False.
  assert hf_config.scale_decoder_outputs == config.tie_word_embeddings
  assert hf_config.task_specific_params == {"summarization": {"prefix": "summarize: "}}
  assert hf_config.architectures == ["T5ForConditionalGeneration"]
  assert T5Config.from_hf_dict(hf_config.to_dict()) == config


def test_generation_config_reads_back_in_transformers(tmp_path):
  config = dataclasses.replace(tiny_config(), pad_token_id=3, eos_token_id=5,
                               decoder_start_token_id=3)
  hf_checkpoint.save_pretrained(str(tmp_path), config, init_params(config, jax.random.key(9)))
  generation = transformers.GenerationConfig.from_pretrained(str(tmp_path))
  assert (generation.decoder_start_token_id, generation.eos_token_id,
          generation.pad_token_id) == (3, 5, 3)
  assert hf_checkpoint.generation_config_dict(config) == json.loads(
      (tmp_path / "generation_config.json").read_text())


def test_bundled_t5_small_config_round_trips(tmp_path):
  source = config_lib.ASSETS_DIR / "t5" / "t5-small-config.json"
  config = T5Config.from_pretrained_json(source)
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  original = transformers.T5Config.from_pretrained(str(source)).to_dict()
  rewritten = transformers.T5Config.from_pretrained(str(tmp_path)).to_dict()
  for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
    original.pop(key, None)
    rewritten.pop(key, None)
  assert rewritten == original


def test_sharded_checkpoint_loads(tmp_path):
  config = tiny_config("gated-gelu", tied=False)
  params = init_params(config, jax.random.key(3))
  tensors = hf_checkpoint.hf_state_dict_from_params(config, params)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[:30],
            "model-00002-of-00002.safetensors": names[30:]}
  for shard, shard_names in shards.items():
    safetensors.numpy.save_file({n: tensors[n] for n in shard_names}, str(tmp_path / shard))
  weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  _, loaded = hf_checkpoint.load_pretrained(str(tmp_path))
  for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(restored, original)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  import ml_dtypes
  config = tiny_config()
  tensors = hf_checkpoint.hf_state_dict_from_params(config, init_params(config, jax.random.key(4)))
  safetensors.numpy.save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
                              str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  _, loaded = hf_checkpoint.load_pretrained(str(tmp_path))
  shared = loaded["shared"]["embedding"]
  assert shared.dtype == np.float32
  np.testing.assert_allclose(shared, tensors["shared.weight"], rtol=1e-2)


def test_missing_tensor_on_disk_is_named(tmp_path):
  config = tiny_config()
  tensors = hf_checkpoint.hf_state_dict_from_params(config, init_params(config, jax.random.key(5)))
  del tensors["encoder.final_layer_norm.weight"]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  with pytest.raises(UserError, match=r"missing tensors: encoder\.final_layer_norm\.weight"):
    hf_checkpoint.load_pretrained(str(tmp_path))


def test_directory_without_weights_or_config(tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
  (tmp_path / "tf_model.h5").write_bytes(b"")
  with pytest.raises(UserError, match=f"no weights in {tmp_path}: expected config.json with "
                                      r"model.safetensors.*\(found only tf_model.h5: convert it "
                                      r"to safetensors\)"):
    hf_checkpoint.load_pretrained(str(tmp_path))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  monkeypatch.setattr(hf_checkpoint, "_torch_available", lambda: False)
  with pytest.raises(UserError, match=f"no weights in {tmp_path}: .*found only "
                                      "pytorch_model.bin, tf_model.h5: install torch to read it, "
                                      "or convert it to safetensors"):
    hf_checkpoint.load_pretrained(str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(UserError, match=f"no config.json in {empty}"):
    hf_checkpoint.load_pretrained(str(empty))


def test_uncached_hub_id_gives_a_one_line_error(tmp_path, monkeypatch):
  """The Hub client is a local fake that finds nothing cached, as huggingface_hub's
  `snapshot_download` does offline: only the error mapping is tested, and nothing is fetched.
  The real client stays in offline mode throughout; only the mode the message reports is
  faked."""
  import huggingface_hub
  from huggingface_hub import errors as hub_errors
  assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest's HF_HUB_OFFLINE=1.
  calls = []

  def uncached_snapshot_download(model_id, allow_patterns, cache_dir):
    calls.append((model_id, cache_dir))
    raise hub_errors.LocalEntryNotFoundError(f"{model_id} is not in the cache")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", uncached_snapshot_download)
  monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
  with pytest.raises(UserError, match="'owner/uncached-model' is not a local directory and is "
                                      r"not cached \(offline mode, HF_HUB_OFFLINE is set\)"):
    hf_checkpoint.load_pretrained("owner/uncached-model", cache_dir=str(tmp_path))
  monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
  with pytest.raises(UserError) as error:
    hf_checkpoint.load_pretrained("someone/not-a-real-model")
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("model 'someone/not-a-real-model' is not a local directory and is "
                            "not cached (the Hub cannot be reached)")
  assert message.endswith("pass a local directory holding config.json and model.safetensors, "
                          "or download the model once while online")
  assert calls == [("owner/uncached-model", str(tmp_path)), ("someone/not-a-real-model", None)]
  assert huggingface_hub.constants.HF_HUB_OFFLINE


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for path in ("./no/such/dir", "no/such/dir", str(tmp_path / "missing"), "~/no-such-flax-sum"):
    with pytest.raises(UserError, match=f"model directory {path} does not exist: pass a "
                                        "directory holding config.json and model.safetensors, "
                                        "or a Hub model id"):
      hf_checkpoint.load_pretrained(path)
  (tmp_path / "weights").write_text("")
  with pytest.raises(UserError, match="weights is a file: pass the directory"):
    hf_checkpoint.load_pretrained("weights")


def test_hub_model_without_safetensors_downloads_torch_weights(tmp_path, monkeypatch):
  import huggingface_hub
  calls = []

  def fake_snapshot_download(model_id, allow_patterns, cache_dir):
    calls.append(allow_patterns)
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  monkeypatch.setattr(hf_checkpoint, "_torch_available", lambda: True)
  assert hf_checkpoint.resolve_model_dir("owner/model") == str(tmp_path)
  assert calls == [hf_checkpoint.HUB_PATTERNS, hf_checkpoint.HUB_TORCH_PATTERNS]
  # Safetensors present, or no torch to read .bin files: one download only.
  (tmp_path / "model.safetensors").write_bytes(b"")
  hf_checkpoint.resolve_model_dir("owner/model")
  (tmp_path / "model.safetensors").unlink()
  monkeypatch.setattr(hf_checkpoint, "_torch_available", lambda: False)
  hf_checkpoint.resolve_model_dir("owner/model")
  assert calls[2:] == [hf_checkpoint.HUB_PATTERNS] * 2


def test_failed_save_keeps_the_previous_model(tmp_path, monkeypatch):
  config = tiny_config()
  hf_checkpoint.save_pretrained(str(tmp_path), config, init_params(config, jax.random.key(6)))
  before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

  helpers.make_safetensors_fail(monkeypatch)
  with pytest.raises(OSError, match="disk full"):
    hf_checkpoint.save_pretrained(str(tmp_path), config, init_params(config, jax.random.key(7)))
  after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
  assert after == before


def test_tokenizer_is_saved_alongside(tmp_path):
  class FakeTokenizer:
    def save_pretrained(self, out_dir):
      with open(os.path.join(out_dir, "spiece.model"), "w") as f:
        f.write("vocab")

  config = tiny_config()
  hf_checkpoint.save_pretrained(str(tmp_path / "out"), config,
                                init_params(config, jax.random.key(8)), FakeTokenizer())
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json",
                                                  "model.safetensors", "spiece.model"]
  metadata = safetensors.safe_open(str(tmp_path / "out" / "model.safetensors"), "np").metadata()
  assert metadata == {"format": "pt"}


def test_the_guard_refuses_hub_downloads():
  # Without a local fake, a Hub id fails before huggingface_hub looks at the cache or the network.
  with pytest.raises(UserError, match=r"^cannot download model 'owner/model' from the Hub: tests "
                                      r"use local files only: refused to download 'owner/model'"):
    hf_checkpoint.resolve_model_dir("owner/model")


def test_the_guard_refuses_hosts_beyond_this_machine(monkeypatch):
  """conftest's guard refuses a lookup or connection beyond this machine before it happens. The
  real socket functions are swapped for recorders first, and the hosts are reserved ones that
  lead nowhere (RFC 6761's .invalid, RFC 5737's documentation network), so a broken guard sends
  nothing either; without the guard installed, the test stops before calling anything."""
  import conftest
  assert socket.getaddrinfo is not conftest.real_getaddrinfo
  assert socket.socket.connect is not conftest.real_connect
  reached = []
  monkeypatch.setattr(conftest, "real_getaddrinfo", lambda *args, **kwargs: reached.append(args))
  monkeypatch.setattr(conftest, "real_connect", lambda sock, address: reached.append(address))
  for host in ("model-hub.invalid", "192.0.2.1"):
    with pytest.raises(OSError, match="tests use local files only: refused to reach"):
      socket.getaddrinfo(host, 443)
    with socket.socket() as sock, pytest.raises(OSError, match="tests use local files only"):
      sock.connect((host, 443))
  assert reached == []
  socket.getaddrinfo("127.0.0.1", 80)  # This machine stays reachable (the fake Hub, gloo).
  assert reached == [("127.0.0.1", 80)]
