"""Hugging Face T5 checkpoints (config.json + model.safetensors) to and from our params.

Reads a local directory or a Hub id (huggingface_hub's cache, HF_HOME, HF_HUB_OFFLINE and token
defaults), with single or sharded safetensors, or `pytorch_model.bin` when torch is installed.
Writes config.json, model.safetensors and generation_config.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from typing import Any, Callable, Iterator, Mapping

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
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_FILE = "pytorch_model.bin.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
HUB_PATTERNS = [CONFIG_FILE, "*.safetensors", WEIGHTS_INDEX_FILE, GENERATION_CONFIG_FILE,
                "spiece.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json"]
# Downloaded only for Hub models without safetensors, and only when torch can read them.
HUB_TORCH_PATTERNS = ["pytorch_model*.bin", TORCH_WEIGHTS_INDEX_FILE]

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


def _torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def _has_safetensors(model_dir: str) -> bool:
  return any(os.path.isfile(os.path.join(model_dir, name))
             for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE))


def _weight_files(model_dir: str, single: str, index: str) -> list[str] | None:
  """The weights files of one format: the single file, the index's shards, or None."""
  if os.path.isfile(os.path.join(model_dir, single)):
    return [os.path.join(model_dir, single)]
  index_path = os.path.join(model_dir, index)
  if not os.path.isfile(index_path):
    return None
  try:
    with open(index_path, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"cannot read the weights index {index_path}: {e!r}") from None
  return [os.path.join(model_dir, shard) for shard in shards]


def _load_safetensors_file(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except (OSError, ValueError, safetensors.SafetensorError) as e:
    raise UserError(f"cannot read the weights file {path}: {e}") from None


def _load_torch_file(path: str) -> dict[str, np.ndarray]:
  import pickle
  import torch  # Imported here: optional, only for pytorch_model.bin checkpoints.
  try:
    # weights_only: a .bin is a pickle, and only tensors are safe to unpickle.
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:
    raise UserError(f"cannot read the weights file {path}: it is not a PyTorch state dict of "
                    "tensors (torch.load with weights_only=True refused it); convert it to "
                    "safetensors") from None
  except (OSError, RuntimeError, ValueError, EOFError) as e:
    raise UserError(f"cannot read the weights file {path}: {_first_line(e)}") from None
  if not isinstance(state_dict, dict):
    raise UserError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors")
  return {name: tensor.detach().to(torch.float32).numpy()
          for name, tensor in state_dict.items() if isinstance(tensor, torch.Tensor)}


def _read_weights(model_dir: str) -> dict[str, np.ndarray]:
  """All tensors of model_dir: safetensors (single or sharded), else PyTorch .bin with torch."""
  files = _weight_files(model_dir, WEIGHTS_FILE, WEIGHTS_INDEX_FILE)
  load_file = _load_safetensors_file
  if files is None:
    torch_files = _weight_files(model_dir, TORCH_WEIGHTS_FILE, TORCH_WEIGHTS_INDEX_FILE)
    if torch_files is not None and _torch_available():
      files, load_file = torch_files, _load_torch_file
    else:
      others = [name for name in (TORCH_WEIGHTS_FILE, TORCH_WEIGHTS_INDEX_FILE, "tf_model.h5",
                                  "flax_model.msgpack")
                if os.path.exists(os.path.join(model_dir, name))]
      hint = ""
      if others:
        fix = ("install torch to read it, or convert it to safetensors"
               if torch_files is not None else "convert it to safetensors")
        hint = f" (found only {', '.join(others)}: {fix})"
      raise UserError(f"no weights in {model_dir}: expected {CONFIG_FILE} with {WEIGHTS_FILE} "
                      f"or a sharded {WEIGHTS_INDEX_FILE}{hint}")
  tensors = {}
  for path in files:
    tensors.update(load_file(path))
  return tensors


def _first_line(error: BaseException) -> str:
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def _download(model_id: str, cache_dir: str | None) -> str:
  """The local snapshot of a Hub model; token, cache and offline mode are huggingface_hub's."""
  import huggingface_hub  # Imported here: only needed for Hub ids.
  from huggingface_hub import errors as hub_errors
  try:
    model_dir = huggingface_hub.snapshot_download(model_id, allow_patterns=HUB_PATTERNS,
                                                  cache_dir=cache_dir)
    if not _has_safetensors(model_dir) and _torch_available():
      model_dir = huggingface_hub.snapshot_download(model_id, allow_patterns=HUB_TORCH_PATTERNS,
                                                    cache_dir=cache_dir)
    return model_dir
  except hub_errors.GatedRepoError:
    raise UserError(f"model '{model_id}' is gated on the Hub: accept its terms and log in with "
                    "`hf auth login`, or pass a local directory") from None
  except hub_errors.RepositoryNotFoundError:
    raise UserError(f"model '{model_id}' is neither a local directory nor a model on the "
                    "Hugging Face Hub (for a private model, log in with `hf auth login`)"
                    ) from None
  except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
    reason = ("offline mode, HF_HUB_OFFLINE is set" if huggingface_hub.is_offline_mode()
              else "the Hub cannot be reached")
    raise UserError(f"model '{model_id}' is not a local directory and is not cached ({reason}): "
                    "pass a local directory holding config.json and model.safetensors, or "
                    "download the model once while online") from None
  except hub_errors.HFValidationError:
    raise UserError(f"model '{model_id}' is not a directory here and not a valid Hub model id"
                    ) from None
  except (hub_errors.HfHubHTTPError, OSError) as e:
    raise UserError(f"cannot download model '{model_id}' from the Hub: {_first_line(e)}"
                    ) from None


def _looks_like_local_path(name: str) -> bool:
  # Hub ids are "name" or "owner/name"; anything else can only be meant as a local path.
  return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_dir(model_name_or_path: str, cache_dir: str | None = None) -> str:
  """The local directory of a model: the path itself, or the Hub snapshot (with tokenizer files)."""
  name = os.fspath(model_name_or_path)
  path = os.path.expanduser(name)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise UserError(f"{path} is a file: pass the directory holding {CONFIG_FILE} and "
                    f"{WEIGHTS_FILE}")
  if _looks_like_local_path(name):
    raise UserError(f"model directory {name} does not exist: pass a directory holding "
                    f"{CONFIG_FILE} and {WEIGHTS_FILE}, or a Hub model id such as "
                    "google/flan-t5-small")
  return _download(name, cache_dir)


def load_pretrained(model_name_or_path: str,
                    cache_dir: str | None = None) -> tuple[T5Config, Params]:
  """(config, params as float32 numpy arrays) from a local directory or a Hub id."""
  model_dir = resolve_model_dir(model_name_or_path, cache_dir)
  if not os.path.isfile(os.path.join(model_dir, CONFIG_FILE)):
    raise UserError(f"no {CONFIG_FILE} in {model_dir}: expected a Hugging Face T5 model "
                    f"directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
  config = T5Config.from_pretrained_json(model_dir)
  return config, params_from_hf_state_dict(config, _read_weights(model_dir))


def generation_config_dict(config: T5Config,
                           generation_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The generation_config.json that transformers' `GenerationConfig` reads: T5's special ids,
  plus the generation settings used (`decode.GenerationSettings.to_hf_dict()`) when given."""
  return {"decoder_start_token_id": config.decoder_start_token_id,
          "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
          **dict(generation_settings or {})}


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


def _json_writer(payload: dict[str, Any]) -> Callable[[str], None]:
  def write(path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(payload, f, indent=2)
      f.write("\n")
  return write


def save_pretrained(out_dir: str, config: T5Config, params: Params, tokenizer: Any = None,
                    generation_settings: Mapping[str, Any] | None = None) -> None:
  """Writes config.json, model.safetensors and generation_config.json (plus the tokenizer's
  files) that transformers' T5ForConditionalGeneration loads with no missing or unexpected keys.

  For tied models only `shared.weight` is written; transformers ties the embed_tokens and
  lm_head to it. `params` must be unreplicated (no leading device axis).
  """
  os.makedirs(out_dir, exist_ok=True)
  tensors = hf_state_dict_from_params(config, params)
  _atomic_write(os.path.join(out_dir, WEIGHTS_FILE),
                lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"}))
  _atomic_write(os.path.join(out_dir, CONFIG_FILE), _json_writer(config.to_hf_dict()))
  _atomic_write(os.path.join(out_dir, GENERATION_CONFIG_FILE),
                _json_writer(generation_config_dict(config, generation_settings)))
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
