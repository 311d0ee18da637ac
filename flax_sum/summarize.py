"""Summarize documents with a saved model: `python -m flax_sum.summarize -h`.

One document per line on stdin (or rows of --input_file), one summary per line on stdout, in
order. Batches are sharded over all local devices with `jax.pmap`; the last one is padded.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import pathlib
import sys
from typing import Any, Iterator, Sequence, TextIO

import jax
import ml_collections
import numpy as np
import tqdm

from flax_sum import cli
from flax_sum import config as config_lib
from flax_sum import decode
from flax_sum import hf_checkpoint
from flax_sum import input_pipeline
from flax_sum import steps
from flax_sum.errors import UserError
from flax_sum.model import T5

PROG = "python -m flax_sum.summarize"

_DESCRIPTION = """\
Writes one summary per input document, in order, with greedy or beam search decoding.

Generation settings not given as flags come from the model's generation_config.json, else its
config.json task_specific_params.summarization (t5-small: 4 beams, min_length 30, ...), else
Hugging Face's defaults. Lengths count the decoder start token, as in Hugging Face."""

_EPILOG = """\
examples:
  python -m flax_sum.summarize --model runs/cnn < articles.txt > summaries.txt
  python -m flax_sum.summarize --model runs/cnn --input_file test.jsonl --text_column article \\
      --num_beams 4 --max_length 142"""

_EXTENSIONS = (".csv", ".json", ".jsonl")


class _Parser(argparse.ArgumentParser):
  """Turns argparse's usage errors into one-line UserErrors."""

  def error(self, message: str):
    raise UserError(f"{message} (see {PROG} -h)")


def _boolean(text: str) -> bool:
  try:
    return cli.parse_bool(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from error


# The generation keys of the run config, as flags of the same names, except that
# generation_max_length is `--max_length`, as in `generate()`.
GENERATION_FIELDS = tuple(f for f in config_lib.FIELDS if f.group == "generate")
FLAG_NAMES = {"generation_max_length": ("--max_length",)}


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, metavar="DIR",
                      help="model directory (config.json + model.safetensors) or Hub id")
  parser.add_argument("--tokenizer_name", metavar="NAME",
                      help="tokenizer directory or Hub id (default: the model's)")
  parser.add_argument("--input_file", metavar="FILE",
                      help=".csv, .json or .jsonl file of documents (default: stdin lines)")
  parser.add_argument("--text_column", metavar="COLUMN",
                      help="column of --input_file holding the documents (default: the first)")
  parser.add_argument("--source_prefix", metavar="TEXT",
                      help="text put before every document (default: the model's "
                      "task_specific_params.summarization.prefix, else none)")
  parser.add_argument("--max_source_length", type=int, default=1024, metavar="N",
                      help="documents are truncated to N tokens (default: 1024)")
  parser.add_argument("--batch_size", type=int, default=32, metavar="N",
                      help="documents per step over all devices (default: 32)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype (default: float32)")
  group = parser.add_argument_group("generation (default: the model's setting)")
  for field in GENERATION_FIELDS:
    flags = FLAG_NAMES.get(field.key, (f"--{field.key}",))
    value_type = _boolean if field.type is bool else field.type
    group.add_argument(*flags, dest=field.key, type=value_type,
                       metavar="BOOL" if field.type is bool else field.type.__name__.upper(),
                       help=field.help)
  return parser


def read_documents(input_file: str | None, text_column: str | None,
                   stdin: TextIO) -> list[str]:
  """The documents: stdin's lines, or one column of a .csv, .json or .jsonl file."""
  if input_file is None:
    if text_column:
      raise UserError("--text_column needs --input_file (stdin holds one document per line)")
    return [line.rstrip("\r\n") for line in stdin]
  path = pathlib.Path(input_file).expanduser()
  if not path.is_file():
    raise UserError(f"--input_file {input_file}: no such file")
  if path.suffix.lower() not in _EXTENSIONS:
    raise UserError(f"--input_file {input_file}: unsupported extension {path.suffix!r}; use "
                    f"one of {', '.join(_EXTENSIONS)}")
  try:
    rows = list(_read_rows(path))
  except (OSError, ValueError, csv.Error) as e:
    raise UserError(f"--input_file {input_file}: cannot parse it: {e}") from None
  if not rows:
    raise UserError(f"--input_file {input_file}: the file has no rows")
  if not all(isinstance(row, dict) for row in rows):
    raise UserError(f"--input_file {input_file}: expected one object (column: value) per row")
  column = text_column or next(iter(rows[0]), None)
  missing = [i + 1 for i, row in enumerate(rows) if column not in row]
  if column is None or missing:
    raise UserError(f"--input_file {input_file}: no column {column!r} in row "
                    f"{missing[0] if missing else 1}; columns: {', '.join(map(str, rows[0]))}")
  return ["" if row[column] is None else str(row[column]).replace("\n", " ") for row in rows]


def _read_rows(path: pathlib.Path) -> Iterator[Any]:
  with open(path, encoding="utf-8", newline="") as f:
    if path.suffix.lower() == ".csv":
      yield from csv.DictReader(f)
      return
    text = f.read()
  if path.suffix.lower() == ".json":
    try:
      data = json.loads(text)
    except ValueError:
      data = None  # Many .json datasets are JSON lines.
    if isinstance(data, dict) and isinstance(data.get("data"), list):
      data = data["data"]
    if isinstance(data, list):
      yield from data
      return
    if isinstance(data, dict):
      yield data
      return
  for line in text.splitlines():
    if line.strip():
      yield json.loads(line)


def _generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
  return {field.key: getattr(args, field.key) for field in GENERATION_FIELDS}


class Summarizer:
  """A loaded model, tokenizer and pmapped generate step."""

  def __init__(self, model_name_or_path: str, tokenizer_name: str | None = None,
               generation: dict[str, Any] | None = None, dtype: str = "float32"):
    model_config, params = hf_checkpoint.load_pretrained(model_name_or_path)
    self.model_config = dataclasses.replace(model_config, dtype=dtype)
    model_dir = hf_checkpoint.resolve_model_dir(model_name_or_path)
    self.settings = decode.resolve(generation or {}, model_config,
                                   decode.read_generation_config(model_dir))
    self.tokenizer = input_pipeline.load_tokenizer(ml_collections.ConfigDict({
        "tokenizer_name": tokenizer_name, "model_name_or_path": model_name_or_path,
        "config_name": None, "cache_dir": None}))
    task_params = (model_config.extra.get("task_specific_params") or {}).get("summarization")
    self.default_prefix = (task_params or {}).get("prefix") or ""
    self.num_devices = jax.local_device_count()
    self.params = steps.replicate(params)
    model, settings = T5(self.model_config), self.settings
    self._generate = jax.pmap(
        lambda p, ids, mask: decode.generate(model, p, ids, mask, settings))

  def __call__(self, documents: Sequence[str], *, batch_size: int = 32,
               source_prefix: str | None = None, max_source_length: int = 1024,
               progress: bool = False) -> list[str]:
    """One summary per document, in order."""
    if batch_size < 1 or max_source_length < 1:
      raise UserError("--batch_size and --max_source_length must be at least 1")
    if not documents:
      return []
    prefix = self.default_prefix if source_prefix is None else source_prefix
    encoded = self.tokenizer([prefix + text for text in documents], max_length=max_source_length,
                             truncation=True)["input_ids"]
    # One source length for every batch: one compilation.
    source_length = max(len(ids) for ids in encoded)
    per_device = math.ceil(min(batch_size, len(documents)) / self.num_devices)
    global_batch = per_device * self.num_devices
    pad = self.model_config.pad_token_id
    summaries: list[str] = []
    with tqdm.tqdm(total=len(documents), unit="doc", file=sys.stderr,
                   disable=not progress) as bar:
      for start in range(0, len(documents), global_batch):
        rows = encoded[start:start + global_batch]
        input_ids = np.full((global_batch, source_length), pad, np.int32)
        mask = np.zeros((global_batch, source_length), np.int32)
        mask[:, 0] = 1  # Padding rows get one visible token.
        for i, ids in enumerate(rows):
          input_ids[i, :len(ids)], mask[i, :len(ids)] = ids, 1
        shard = lambda x: x.reshape((self.num_devices, per_device) + x.shape[1:])
        tokens = np.asarray(self._generate(self.params, shard(input_ids), shard(mask)))
        tokens = tokens.reshape(global_batch, -1)[:len(rows)]
        summaries.extend(text.strip().replace("\n", " ") for text in
                         self.tokenizer.batch_decode(tokens, skip_special_tokens=True))
        bar.update(len(rows))
    return summaries


def main(argv: list[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
  for noisy in ("absl", "jax", "transformers"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  try:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    documents = read_documents(args.input_file, args.text_column, stdin)
    summarizer = Summarizer(args.model, args.tokenizer_name, _generation_overrides(args),
                            args.dtype)
    summaries = summarizer(documents, batch_size=args.batch_size,
                           source_prefix=args.source_prefix,
                           max_source_length=args.max_source_length, progress=True)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  for summary in summaries:
    stdout.write(summary + "\n")
  stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
