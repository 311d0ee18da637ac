"""Export a training checkpoint as a Hugging Face model directory: `python -m flax_sum.export -h`.

The directory (config.json, model.safetensors, generation_config.json and the tokenizer's files)
loads in transformers' `T5ForConditionalGeneration.from_pretrained` and in `--model_name_or_path`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import ml_collections

from flax_sum import checkpoints
from flax_sum import config as config_lib
from flax_sum import hf_checkpoint
from flax_sum import input_pipeline
from flax_sum.errors import UserError

PROG = "python -m flax_sum.export"

_DESCRIPTION = """\
Writes a flax-sum checkpoint as a Hugging Face T5 directory: config.json, model.safetensors,
generation_config.json and the tokenizer's files.

CKPT is a checkpoint step directory (OUTPUT_DIR/checkpoints/STEP) or a training output_dir,
meaning its latest checkpoint. The tokenizer is --tokenizer_name if given, else the one in the
checkpoint's output_dir, else the one its run trained with (run_config.json), else the bundled
T5 tokenizer."""

_EPILOG = """\
examples:
  python -m flax_sum.export runs/cnn runs/cnn-hf
  python -m flax_sum.export runs/cnn/checkpoints/2000 runs/cnn-step2000 --overwrite

Nothing in OUT changes until the whole export is written: a failed export keeps the old model."""

# Files of a Hugging Face model directory; with --overwrite, the ones this export does not write
# are removed from OUT so that no stale weights or tokenizer files are mixed with the new model.
_MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "model.safetensors", "model*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "tf_model.h5", "flax_model.msgpack", "spiece.model", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_RUN_CONFIG_FILE = "run_config.json"
_TOKENIZER_KEYS = ("tokenizer_name", "model_name_or_path", "config_name", "cache_dir")


class _Parser(argparse.ArgumentParser):
  """Turns argparse's usage errors into one-line UserErrors."""

  def error(self, message: str):
    raise UserError(f"{message} (see {PROG} -h)")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint", metavar="CKPT",
                      help="checkpoint step directory, or a training output_dir (latest step)")
  parser.add_argument("out_dir", metavar="OUT", help="directory to write the model into")
  parser.add_argument("--tokenizer_name", metavar="NAME",
                      help="tokenizer directory or Hub id to save with the model")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into a non-empty OUT, replacing the model files there")
  return parser


def _tokenizer_settings(output_dir: pathlib.Path, tokenizer_name: str | None) -> dict[str, Any]:
  """The `input_pipeline.load_tokenizer` settings that pick the export's tokenizer."""
  settings: dict[str, Any] = dict.fromkeys(_TOKENIZER_KEYS)
  if tokenizer_name:
    settings["tokenizer_name"] = tokenizer_name
  elif any((output_dir / name).is_file() for name in input_pipeline.TOKENIZER_FILES):
    settings["tokenizer_name"] = str(output_dir)
  elif (output_dir / _RUN_CONFIG_FILE).is_file():
    try:
      run_config = json.loads((output_dir / _RUN_CONFIG_FILE).read_text(encoding="utf-8"))
      settings.update({key: run_config.get(key) for key in _TOKENIZER_KEYS})
    except (OSError, ValueError, AttributeError) as e:
      raise UserError(f"cannot read {output_dir / _RUN_CONFIG_FILE} to find the run's "
                      f"tokenizer ({e}): pass --tokenizer_name") from None
  else:
    settings["tokenizer_name"] = str(config_lib.BUNDLED_TOKENIZER_DIR)
  return settings


def load_tokenizer(step_dir: pathlib.Path, tokenizer_name: str | None = None) -> Any:
  """The tokenizer to save with the checkpoint in step_dir (see the module's -h)."""
  output_dir = step_dir.parent.parent
  settings = _tokenizer_settings(output_dir, tokenizer_name)
  return input_pipeline.load_tokenizer(ml_collections.ConfigDict(settings))


def _check_out_dir(out_dir: pathlib.Path, step_dir: pathlib.Path, overwrite: bool) -> None:
  if out_dir.exists() and not out_dir.is_dir():
    raise UserError(f"OUT {out_dir} is a file: choose a directory")
  if out_dir == step_dir.parent or step_dir.parent in out_dir.parents:
    raise UserError(f"OUT {out_dir} is inside the checkpoints directory {step_dir.parent}: "
                    "choose another directory")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise UserError(f"OUT {out_dir} is not empty: pass --overwrite to replace the model "
                    "files in it, or choose another directory")


def _publish(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
  """Moves the finished export into out_dir, each file replaced atomically; model files that the
  export did not write are removed."""
  umask = os.umask(0)
  os.umask(umask)
  if not out_dir.exists() or not any(out_dir.iterdir()):
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates the directory private (0700).
    os.replace(staging, out_dir)
    return
  written = {path.name for path in staging.iterdir()}
  for name in sorted(written):
    os.replace(staging / name, out_dir / name)
  for path in out_dir.iterdir():
    if (path.is_file() and path.name not in written
        and any(fnmatch.fnmatch(path.name, pattern) for pattern in _MODEL_FILE_PATTERNS)):
      path.unlink()


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
           tokenizer_name: str | None = None, overwrite: bool = False) -> pathlib.Path:
  """Writes the checkpoint as a Hugging Face directory; returns the step directory exported."""
  step_dir = checkpoints.find_step_dir(checkpoint)
  out_dir = pathlib.Path(out_dir).expanduser().resolve()
  _check_out_dir(out_dir, step_dir, overwrite)
  model_config, params = checkpoints.load_params(step_dir)
  tokenizer = load_tokenizer(step_dir, tokenizer_name)
  if len(tokenizer) > model_config.vocab_size:
    raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                    f"{model_config.vocab_size}: pass a matching --tokenizer_name")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
  try:
    hf_checkpoint.save_pretrained(str(staging), dataclasses.replace(model_config, dtype="float32"),
                                  params, tokenizer)
    _publish(staging, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return step_dir


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
  for noisy in ("absl", "jax", "orbax", "transformers"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  try:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    step_dir = export(args.checkpoint, args.out_dir, args.tokenizer_name, args.overwrite)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"Exported {step_dir} (step {step_dir.name}) to {pathlib.Path(args.out_dir).resolve()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
