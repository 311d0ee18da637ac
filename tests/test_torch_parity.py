"""Our saved checkpoints in transformers' PyTorch T5 give the same outputs as our Flax T5, and
PyTorch `pytorch_model.bin` checkpoints load exactly."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from flax_sum import hf_checkpoint
from flax_sum import decode
from flax_sum.decode import greedy_generate
from flax_sum.errors import UserError
from flax_sum.model import T5, T5Config, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANTS = {"relu-tied": ("relu", True), "gated-gelu-untied": ("gated-gelu", False),
            "gated-silu-tied": ("gated-silu", True)}


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
  # Torch's worker threads contend with XLA's on small CPUs and slow generate() 100-fold.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def models(request, tmp_path_factory):
  feed_forward_proj, tied = VARIANTS[request.param]
  # Sequences longer than max_distance exercise the logarithmic position buckets.
  config = T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                    num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=12, feed_forward_proj=feed_forward_proj,
                    tie_word_embeddings=tied)
  params = init_params(config, jax.random.key(7))
  out_dir = str(tmp_path_factory.mktemp("parity"))
  hf_checkpoint.save_pretrained(out_dir, config, params)
  torch_model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      out_dir, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not info["mismatched_keys"]
  return T5(config), params, torch_model.eval()


def batch():
  rng = np.random.default_rng(0)
  input_ids = rng.integers(2, 120, (3, 30))
  mask = np.ones_like(input_ids)
  mask[1, 20:] = 0
  mask[2, 6:] = 0
  decoder_ids = rng.integers(2, 120, (3, 25))
  decoder_mask = np.ones_like(decoder_ids)
  decoder_mask[0, 18:] = 0
  return input_ids, mask, decoder_ids, decoder_mask


def test_encoder_outputs_and_logits_match(models):
  model, params, torch_model = models
  input_ids, mask, decoder_ids, decoder_mask = batch()
  with torch.no_grad():
    expected = torch_model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                           decoder_input_ids=torch.tensor(decoder_ids),
                           decoder_attention_mask=torch.tensor(decoder_mask))
  encoded = model.apply({"params": params}, input_ids, mask, method=T5.encode)
  logits = model.apply({"params": params}, input_ids, mask, decoder_ids, decoder_mask)
  # Compare real (unpadded) positions only.
  np.testing.assert_allclose(np.asarray(encoded) * mask[..., None],
                             expected.encoder_last_hidden_state.numpy() * mask[..., None],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits) * decoder_mask[..., None],
                             expected.logits.numpy() * decoder_mask[..., None], atol=1e-4, rtol=0)


def test_greedy_generation_matches(models):
  model, params, torch_model = models
  input_ids, mask, _, _ = batch()
  max_length = 16

  def torch_greedy(eos_token_id: int) -> np.ndarray:
    # use_cache=False: transformers' generation cache breaks when num_decoder_layers differs
    # from num_layers.
    with torch.no_grad():
      tokens = torch_model.generate(
          input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask), do_sample=False,
          num_beams=1, max_new_tokens=max_length, eos_token_id=eos_token_id, pad_token_id=0,
          use_cache=False).numpy()[:, 1:]
    return np.pad(tokens, ((0, 0), (0, max_length - tokens.shape[1])))

  # Make the 4th token of row 0 the EOS so that rows end at different steps.
  eos = int(torch_greedy(model.config.eos_token_id)[0, 3])
  expected = torch_greedy(eos)
  assert (expected[0, 4:] == 0).all()
  eos_model = T5(dataclasses.replace(model.config, eos_token_id=eos))
  tokens = jax.jit(lambda p: greedy_generate(eos_model, p, input_ids, mask, max_length))(params)
  np.testing.assert_array_equal(np.asarray(tokens), expected)


GENERATION_SETTINGS = {
    "greedy-ngram3-min5": dict(num_beams=1, no_repeat_ngram_size=3, min_length=5),
    "beam3-lp2-ngram2-min4-early": dict(num_beams=3, length_penalty=2.0, no_repeat_ngram_size=2,
                                        min_length=4, early_stopping=True),
    "beam4-lp0.6": dict(num_beams=4, length_penalty=0.6, early_stopping=False),
    "beam4-ngram3-early": dict(num_beams=4, no_repeat_ngram_size=3, early_stopping=True),
}


def pad_after_eos(tokens: np.ndarray, width: int, eos: int, pad: int = 0) -> np.ndarray:
  """transformers' outputs cut to `width`, with pad after each row's first EOS."""
  out = np.full((tokens.shape[0], width), pad, tokens.dtype)
  for row, source in zip(out, tokens):
    hits = np.flatnonzero(source == eos)
    end = hits[0] + 1 if hits.size else len(source)
    row[:min(end, width)] = source[:min(end, width)]
  return out


def pick_eos(tokens: np.ndarray, pad: int) -> int:
  """A token first emitted mid-sequence in as many rows as possible: as EOS, it makes the
  hypotheses end at different steps."""
  width = tokens.shape[1]

  def score(token: int) -> tuple[int, int]:
    firsts = [np.flatnonzero(row == token)[:1] for row in tokens]
    middle = sum(1 for hits in firsts if hits.size and 2 <= hits[0] < width - 3)
    return middle, -sum(1 for hits in firsts if hits.size and hits[0] < 2)

  return max((t for t in np.unique(tokens) if t != pad), key=score)


@pytest.mark.parametrize("name", list(GENERATION_SETTINGS))
def test_generate_matches_transformers(models, name):
  model, params, torch_model = models
  if model.config.feed_forward_proj == "gated-silu":
    pytest.skip("relu-tied and gated-gelu-untied cover generation; the slow torch side is spared")
  input_ids, mask, _, _ = batch()
  settings = dataclasses.replace(decode.GenerationSettings.greedy(model.config, 16),
                                 **GENERATION_SETTINGS[name])
  run = lambda s: np.asarray(jax.jit(lambda p: decode.generate(model, p, input_ids, mask, s))(
      params))
  eos = int(pick_eos(run(dataclasses.replace(settings, eos_token_id=-1)), 0))
  settings = dataclasses.replace(settings, eos_token_id=eos)
  with torch.no_grad():
    # use_cache=False: transformers' cache breaks when num_decoder_layers != num_layers.
    expected = torch_model.generate(
        input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask), do_sample=False,
        max_length=settings.max_new_tokens + 1, num_beams=settings.num_beams,
        min_length=settings.min_length, length_penalty=settings.length_penalty,
        early_stopping=settings.early_stopping,
        no_repeat_ngram_size=settings.no_repeat_ngram_size, eos_token_id=eos,
        pad_token_id=0, decoder_start_token_id=0, use_cache=False).numpy()[:, 1:]
  expected = pad_after_eos(expected, settings.max_new_tokens, eos)
  np.testing.assert_array_equal(run(settings), expected)


def write_torch_checkpoint(model_dir, config: T5Config, state_dict, num_shards: int = 1) -> None:
  """A pre-safetensors transformers directory: config.json with pytorch_model.bin (or shards)."""
  (model_dir / "config.json").write_text(json.dumps(config.to_hf_dict()))
  if num_shards == 1:
    torch.save(state_dict, model_dir / "pytorch_model.bin")
    return
  names = sorted(state_dict)
  weight_map = {}
  for shard in range(num_shards):
    shard_file = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
    shard_names = names[shard::num_shards]
    torch.save({name: state_dict[name] for name in shard_names}, model_dir / shard_file)
    weight_map.update(dict.fromkeys(shard_names, shard_file))
  (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("num_shards", [1, 2])
def test_pytorch_model_bin_loads_exactly(models, num_shards, tmp_path):
  model, params, torch_model = models
  # transformers 5 always saves safetensors; older versions wrote state_dict() with torch.save.
  state_dict = torch_model.state_dict()
  half = {name: tensor.to(torch.bfloat16) for name, tensor in state_dict.items()}
  write_torch_checkpoint(tmp_path, model.config, state_dict if num_shards == 1 else half,
                         num_shards)
  config, loaded = hf_checkpoint.load_pretrained(str(tmp_path))
  assert config == model.config
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    assert restored.dtype == np.float32
    if num_shards == 1:
      np.testing.assert_array_equal(restored, original)
    else:  # bfloat16 weights are read as float32.
      np.testing.assert_allclose(restored, original, rtol=1e-2, atol=1e-6)


def test_unreadable_pytorch_model_bin(tmp_path):
  config = T5Config(vocab_size=10, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2)
  write_torch_checkpoint(tmp_path, config, {})
  (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle\n" * 4)
  with pytest.raises(UserError, match="cannot read the weights file .*pytorch_model.bin: it is "
                                      "not a PyTorch state dict of tensors"):
    hf_checkpoint.load_pretrained(str(tmp_path))
  # A pickled object other than tensors is refused, never executed.
  torch.save({"shared.weight": torch.ones(2), "hook": _Unsafe()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(UserError, match="weights_only=True refused it"):
    hf_checkpoint.load_pretrained(str(tmp_path))


class _Unsafe:
  pass
