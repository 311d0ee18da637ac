"""Hugging Face T5 checkpoints (config.json + model.safetensors) to and from our params."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Iterator

import jax
import numpy as np
import safetensors.numpy

from flax_sum.errors import UserError
from flax_sum.model import T5Config

Params = dict[str, Any]
PathTuple = tuple[str, ...]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = [CONFIG_FILE, "*.safetensors", WEIGHTS_INDEX_FILE, "generation_config.json",
                "spiece.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json"]

# Tensors older checkpoints carry that hold no parameter of their own.
_IGNORED_TENSORS = frozenset({
    "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
})


def _tensor_names(config: T5Config) -> Iterator[tuple[str, PathTuple, bool]]:
  """(Hugging Face name, our param path, whether the tensor is a transposed kernel)."""
  yield "shared.weight", ("shared", "embedding"), False
  if not config.tie_word_embeddings:
    yield "lm_head.weight", ("lm_head", "kernel"), True
  ff_names = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
  for stack, num_layers in (("encoder", config.num_layers),
                            ("decoder", config.num_decoder_layers)):
    for i in range(num_layers):
      hf_block, block = f"{stack}.block.{i}.layer", (stack, f"block_{i}")
      attention_layers = [(0, "SelfAttention")] + ([(1, "EncDecAttention")]
                                                   if stack == "decoder" else [])
      for layer, attention in attention_layers:
        for proj in ("q", "k", "v", "o"):
          yield (f"{hf_block}.{layer}.{attention}.{proj}.weight",
                 block + (f"layer_{layer}", attention, proj, "kernel"), True)
        if i == 0 and attention == "SelfAttention":
          yield (f"{hf_block}.0.SelfAttention.relative_attention_bias.weight",
                 block + ("layer_0", "SelfAttention", "relative_attention_bias", "embedding"),
                 False)
        yield (f"{hf_block}.{layer}.layer_norm.weight",
               block + (f"layer_{layer}", "layer_norm", "scale"), False)
      ff = len(attention_layers)
      for proj in ff_names:
        yield (f"{hf_block}.{ff}.DenseReluDense.{proj}.weight",
               block + (f"layer_{ff}", "DenseReluDense", proj, "kernel"), True)
      yield (f"{hf_block}.{ff}.layer_norm.weight", block + (f"layer_{ff}", "layer_norm", "scale"),
             False)
    yield f"{stack}.final_layer_norm.weight", (stack, "final_layer_norm", "scale"), False


def _abbreviate(names: list[str], limit: int = 5) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _set_path(tree: Params, path: PathTuple, value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: Params, path: PathTuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf_state_dict(config: T5Config, tensors: dict[str, np.ndarray]) -> Params:
  """Our float32 params from Hugging Face tensors; every param must be filled, every tensor used."""
  tensors = dict(tensors)
  if "shared.weight" not in tensors:
    # Tied aliases of the shared embedding, as some exporters write only these.
    for alias in ("decoder.embed_tokens.weight", "encoder.embed_tokens.weight"):
      if alias in tensors:
        tensors["shared.weight"] = tensors[alias]
        break
  if config.tie_word_embeddings and "lm_head.weight" in tensors:
    lm_head = tensors.pop("lm_head.weight")
    if "shared.weight" in tensors and not np.array_equal(lm_head, tensors["shared.weight"]):
      raise UserError("the checkpoint's lm_head.weight differs from shared.weight but config.json "
                      "says the embeddings are tied: set \"tie_word_embeddings\": false in "
                      "config.json")
  if (not config.tie_word_embeddings and "lm_head.weight" not in tensors
      and "shared.weight" in tensors):
    # transformers 5 ties the head even for unscaled (v1.1-style) configs and saves it once.
    tensors["lm_head.weight"] = tensors["shared.weight"]

  params: Params = {}
  missing, wrong_shapes, used = [], [], set()
  for hf_name, path, transpose in _tensor_names(config):
    if hf_name not in tensors:
      missing.append(hf_name)
      continue
    used.add(hf_name)
    value = np.asarray(tensors[hf_name], dtype=np.float32)
    value = np.ascontiguousarray(value.T) if transpose else value
    expected = _expected_shape(config, path)
    if value.shape != expected:
      wrong_shapes.append(f"{hf_name} {tuple(value.shape)} (expected {expected})")
    _set_path(params, path, value)
  unexpected = sorted(set(tensors) - used - _IGNORED_TENSORS)
  problems = []
  if missing:
    problems.append(f"missing tensors: {_abbreviate(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_abbreviate(unexpected)}")
  if wrong_shapes:
    problems.append(f"wrong shapes: {_abbreviate(wrong_shapes, 3)}")
  if problems:
    raise UserError("the checkpoint does not match its T5 config.json; " + "; ".join(problems))
  return params


def _expected_shape(config: T5Config, path: PathTuple) -> tuple[int, ...]:
  inner = config.num_heads * config.d_kv
  module, leaf = path[-2], path[-1]
  if module == "shared":
    return (config.vocab_size, config.d_model)
  if module == "lm_head":
    return (config.d_model, config.vocab_size)
  if module == "relative_attention_bias":
    return (config.relative_attention_num_buckets, config.num_heads)
  if leaf == "scale":
    return (config.d_model,)
  return {"q": (config.d_model, inner), "k": (config.d_model, inner),
          "v": (config.d_model, inner), "o": (inner, config.d_model),
          "wi": (config.d_model, config.d_ff), "wi_0": (config.d_model, config.d_ff),
          "wi_1": (config.d_model, config.d_ff), "wo": (config.d_ff, config.d_model)}[module]


def hf_state_dict_from_params(config: T5Config, params: Params) -> dict[str, np.ndarray]:
  """Hugging Face tensors (float32, contiguous, torch [out, in] layout) from our params."""
  params = jax.device_get(params)
  tensors = {}
  for hf_name, path, transpose in _tensor_names(config):
    try:
      value = np.asarray(_get_path(params, path), dtype=np.float32)
    except KeyError:
      raise ValueError(f"params have no {'/'.join(path)} (for {hf_name})") from None
    if value.shape != _expected_shape(config, path):
      raise ValueError(f"{'/'.join(path)} has shape {value.shape}, expected "
                       f"{_expected_shape(config, path)} (unreplicate pmapped params first)")
    tensors[hf_name] = np.ascontiguousarray(value.T if transpose else value)
  return tensors


def _read_safetensors(model_dir: str) -> dict[str, np.ndarray]:
  single = os.path.join(model_dir, WEIGHTS_FILE)
  index = os.path.join(model_dir, WEIGHTS_INDEX_FILE)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(model_dir, shard) for shard in shards]
  else:
    others = [name for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
              if os.path.exists(os.path.join(model_dir, name))]
    hint = (f" (found only {', '.join(others)}: convert it to safetensors)" if others else "")
    raise UserError(f"no weights in {model_dir}: expected {CONFIG_FILE} with {WEIGHTS_FILE} "
                    f"or a sharded {WEIGHTS_INDEX_FILE}{hint}")
  tensors = {}
  for path in files:
    try:
      tensors.update(safetensors.numpy.load_file(path))
    except (OSError, ValueError, safetensors.SafetensorError) as e:
      raise UserError(f"cannot read the weights file {path}: {e}") from None
  return tensors


def _download(model_id: str, cache_dir: str | None) -> str:
  import huggingface_hub  # Imported here: only needed for Hub ids.
  from huggingface_hub import errors as hub_errors
  try:
    return huggingface_hub.snapshot_download(model_id, allow_patterns=HUB_PATTERNS,
                                             cache_dir=cache_dir)
  except hub_errors.GatedRepoError:
    raise UserError(f"model '{model_id}' is gated on the Hub: accept its terms and log in with "
                    "`hf auth login`, or pass a local directory") from None
  except hub_errors.RepositoryNotFoundError:
    raise UserError(f"model '{model_id}' is neither a local directory nor a model on the "
                    "Hugging Face Hub") from None
  except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
    raise UserError(f"model '{model_id}' is not in the local cache and the Hub cannot be "
                    "reached: pass a local directory with config.json and model.safetensors"
                    ) from None
  except hub_errors.HFValidationError:
    raise UserError(f"model '{model_id}' is not a directory here and not a valid Hub model id"
                    ) from None
  except (hub_errors.HfHubHTTPError, OSError) as e:
    raise UserError(f"cannot download model '{model_id}' from the Hub: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def resolve_model_dir(model_name_or_path: str, cache_dir: str | None = None) -> str:
  """The local directory of a model: the path itself, or the Hub snapshot (with tokenizer files)."""
  path = os.path.expanduser(os.fspath(model_name_or_path))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise UserError(f"{path} is a file: pass the directory holding {CONFIG_FILE} and "
                    f"{WEIGHTS_FILE}")
  return _download(model_name_or_path, cache_dir)


def load_pretrained(model_name_or_path: str,
                    cache_dir: str | None = None) -> tuple[T5Config, Params]:
  """(config, params as float32 numpy arrays) from a local directory or a Hub id."""
  model_dir = resolve_model_dir(model_name_or_path, cache_dir)
  if not os.path.isfile(os.path.join(model_dir, CONFIG_FILE)):
    raise UserError(f"no {CONFIG_FILE} in {model_dir}: expected a Hugging Face T5 model "
                    f"directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
  config = T5Config.from_pretrained_json(model_dir)
  return config, params_from_hf_state_dict(config, _read_safetensors(model_dir))


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Writes via a temporary file in the same directory, so `path` is never left half-written."""
  directory, name = os.path.split(os.path.abspath(path))
  fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
  os.close(fd)
  try:
    write(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates the file private (0600).
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def save_pretrained(out_dir: str, config: T5Config, params: Params,
                    tokenizer: Any = None) -> None:
  """Writes config.json and model.safetensors that transformers' T5ForConditionalGeneration loads.

  For tied models only `shared.weight` is written; transformers ties the embed_tokens and
  lm_head to it. `params` must be unreplicated (no leading device axis).
  """
  os.makedirs(out_dir, exist_ok=True)
  tensors = hf_state_dict_from_params(config, params)

  def write_config(tmp_path: str) -> None:
    with open(tmp_path, "w", encoding="utf-8") as f:
      json.dump(config.to_hf_dict(), f, indent=2)
      f.write("\n")

  _atomic_write(os.path.join(out_dir, WEIGHTS_FILE),
                lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"}))
  _atomic_write(os.path.join(out_dir, CONFIG_FILE), write_config)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
