"""Input pipeline: load, clean, tokenize and batch summarization data.

  load_raw_datasets(config)            Hub dataset and/or local csv/json/jsonl files, bad rows
                                       dropped, max_*_samples applied
  tokenize_datasets(raw, tok, config)  per-example token ids, cached by the datasets fingerprint
  to_arrays(dataset, ...)              one split as padded numpy arrays, built once
  train_batches / eval_batches         numpy batches [devices, per_device, ...], padded to the
                                       max lengths or to a few static length buckets
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import transformers
from ml_collections import ConfigDict

from flax_sum import config as config_lib
from flax_sum.errors import UserError

Batch = dict[str, np.ndarray]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MODE_FOR_SPLIT = {"train": "do_train", "validation": "do_eval", "test": "do_predict"}
FILE_KEY_FOR_SPLIT = {"train": "train_file", "validation": "validation_file",
                      "test": "test_file"}
MAX_SAMPLES_KEY_FOR_SPLIT = {"train": "max_train_samples", "validation": "max_eval_samples",
                             "test": "max_predict_samples"}
BUILDER_FOR_EXTENSION = {".csv": "csv", ".json": "json", ".jsonl": "json"}
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")

PAD_TOKEN_ID = 0
DECODER_START_TOKEN_ID = 0  # T5 starts decoding from its pad token.

TOKENIZED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "example_index": datasets.Value("int32"),
})


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def load_tokenizer(config: ConfigDict) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer named by tokenizer_name, model_name_or_path, config_name, else the bundled T5."""
  if config.tokenizer_name:
    return _load_named_tokenizer(config.tokenizer_name, "--tokenizer_name", config.cache_dir)
  if config.model_name_or_path:
    return _load_named_tokenizer(config.model_name_or_path, "--model_name_or_path",
                                 config.cache_dir)
  if config.config_name:
    config_dir = pathlib.Path(config.config_name).expanduser()
    if config_dir.is_file():
      config_dir = config_dir.parent
    if config_dir.is_dir() and _has_tokenizer_files(config_dir):
      return _tokenizer_from_dir(config_dir, "--config_name")
  return _tokenizer_from_dir(config_lib.BUNDLED_TOKENIZER_DIR, "bundled tokenizer")


def _has_tokenizer_files(directory: pathlib.Path) -> bool:
  return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _looks_like_local_path(name: str) -> bool:
  # Hub ids are "name" or "owner/name"; anything else can only be meant as a local path.
  return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _load_named_tokenizer(name: str, flag: str,
                          cache_dir: str | None) -> transformers.PreTrainedTokenizerBase:
  path = pathlib.Path(name).expanduser()
  if path.is_file() and path.name in TOKENIZER_FILES:
    path = path.parent
  if path.is_dir():
    return _tokenizer_from_dir(path, flag)
  if path.exists() or _looks_like_local_path(name):
    raise UserError(f"{flag} {name}: not a directory; expected a directory holding "
                    f"{' or '.join(TOKENIZER_FILES)}, or a Hub model id")
  try:
    return transformers.AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
  except Exception as error:  # Hub errors come in many types; all mean the same to the user.
    raise UserError(f"{flag} {name}: not a local directory, and loading its tokenizer from the "
                    f"Hub failed: {_first_line(error)}") from error


def _tokenizer_from_dir(directory: pathlib.Path,
                        flag: str) -> transformers.PreTrainedTokenizerBase:
  has_spiece = (directory / "spiece.model").is_file()
  if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
    try:
      return transformers.AutoTokenizer.from_pretrained(str(directory))
    except Exception as error:
      if not has_spiece:
        raise UserError(f"{flag} {directory}: cannot load its tokenizer: "
                        f"{_first_line(error)}") from error
  if has_spiece:
    # T5Tokenizer(vocab_file=...) builds a broken 104-token vocabulary; from_pretrained is right.
    return transformers.T5Tokenizer.from_pretrained(str(directory))
  raise UserError(f"{flag} {directory}: no tokenizer found; expected "
                  f"{' or '.join(TOKENIZER_FILES)} in that directory")


# ----------------------------------------------------------------------------------------------
# Raw data.


def active_splits(config: ConfigDict) -> list[str]:
  """The splits the run needs: train for do_train, validation for do_eval, test for do_predict."""
  return [split for split in SPLITS if getattr(config, MODE_FOR_SPLIT[split])]


def target_length(config: ConfigDict, split: str) -> int:
  """Summary length in tokens: max_target_length for train, val_max_target_length otherwise."""
  if split == "train":
    return config.max_target_length
  return config.val_max_target_length or config.max_target_length


def length_buckets(config: ConfigDict, split: str) -> "LengthBuckets | None":
  """How a split's batches are padded: None (to the max lengths) with pad_to_max_length."""
  if config.pad_to_max_length:
    return None
  return LengthBuckets.evenly_spaced(config.max_source_length, target_length(config, split),
                                     config.length_buckets)


def load_raw_datasets(config: ConfigDict) -> dict[str, datasets.Dataset]:
  """Loads the splits of the active modes, drops empty rows and applies max_*_samples.

  Local files win for the splits they name; the other splits come from config.dataset_name.
  The returned datasets keep all their columns.
  """
  splits = active_splits(config)
  for split in splits:
    if not getattr(config, FILE_KEY_FOR_SPLIT[split]) and not config.dataset_name:
      raise UserError(f"--{MODE_FOR_SPLIT[split]} needs {split} data: pass "
                      f"--{FILE_KEY_FOR_SPLIT[split]} or --dataset_name")
    max_samples = getattr(config, MAX_SAMPLES_KEY_FOR_SPLIT[split])
    if max_samples is not None and max_samples <= 0:
      raise UserError(f"--{MAX_SAMPLES_KEY_FOR_SPLIT[split]} must be positive, "
                      f"got {max_samples}")

  loaded: dict[str, datasets.Dataset] = {}
  hub_splits = []
  for split in splits:
    data_file = getattr(config, FILE_KEY_FOR_SPLIT[split])
    if data_file:
      loaded[split] = _load_local_file(data_file, split, config.cache_dir)
    else:
      hub_splits.append(split)
  if hub_splits:
    loaded.update(_load_hub_splits(config, hub_splits))

  return {split: _clean_split(loaded[split], split, config) for split in splits}


def _load_local_file(data_file: str, split: str, cache_dir: str | None) -> datasets.Dataset:
  flag = f"--{FILE_KEY_FOR_SPLIT[split]}"
  path = pathlib.Path(data_file).expanduser()
  if path.is_dir():
    raise UserError(f"{flag} {data_file} is a directory: pass a "
                    f"{', '.join(BUILDER_FOR_EXTENSION)} file")
  if not path.is_file():
    raise UserError(f"{flag} {data_file}: no such file")
  builder = BUILDER_FOR_EXTENSION.get(path.suffix.lower())
  if builder is None:
    raise UserError(f"{flag} {data_file}: unsupported extension {path.suffix!r}; use one of "
                    f"{', '.join(BUILDER_FOR_EXTENSION)}")
  try:
    if _is_blank(path):
      raise UserError(f"{flag} {data_file}: the file is empty")
    not_utf8 = _find_non_utf8_line(path)
  except OSError as error:
    raise UserError(f"{flag} {data_file}: cannot read it ({error.strerror or error}): fix its "
                    "permissions or pass another file") from error
  if not_utf8 is not None:
    raise UserError(f"{flag} {data_file}: {not_utf8}; save the file as UTF-8 text")
  try:
    with _datasets_errors_unlogged():
      dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split,
                                      cache_dir=cache_dir)
  except Exception as error:  # pyarrow, pandas and datasets each raise their own types.
    if "corresponds to no data" in str(error):
      raise UserError(f"{flag} {data_file}: the file has no rows") from error
    raise UserError(f"{flag} {data_file}: cannot parse it: "
                    f"{_describe_parse_error(path, error)}") from error
  if len(dataset) == 0:
    raise UserError(f"{flag} {data_file}: the file has no rows")
  return dataset


@contextlib.contextmanager
def _datasets_errors_unlogged() -> Iterator[None]:
  """Keeps `datasets` from logging a parse error (on a handler of its own, on stderr) that the
  caller reports as its one-line error."""
  logger = logging.getLogger("datasets")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _find_non_utf8_line(path: pathlib.Path) -> str | None:
  """'line N is not UTF-8 (...)' for the first line that does not decode; None if all do.
  Checked up front: the JSON reader lets invalid bytes through into the text columns."""
  with path.open("rb") as f:
    for line_number, line in enumerate(f, start=1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as error:
        return (f"line {line_number} is not UTF-8 (byte 0x{line[error.start]:02x} at byte "
                f"{error.start + 1} of the line)")
  return None


def _is_blank(path: pathlib.Path, probe_bytes: int = 1 << 16) -> bool:
  """True for an empty or whitespace-only file (only small files are read in full)."""
  size = path.stat().st_size
  if size > probe_bytes:
    return False
  return not path.read_bytes().strip()


def _describe_parse_error(path: pathlib.Path, error: BaseException) -> str:
  if path.suffix.lower() in (".json", ".jsonl"):
    bad_line = _find_bad_json_line(path)
    if bad_line is not None:
      return bad_line
  return _first_line(_root_cause(error))


def _find_bad_json_line(path: pathlib.Path) -> str | None:
  """'line N: why' for the first malformed line of a JSON (lines) file; None if none is found."""
  with path.open(encoding="utf-8", errors="replace") as f:
    text_start = f.read(4096).lstrip()
    f.seek(0)
    if text_start.startswith("["):
      try:
        json.load(f)
      except json.JSONDecodeError as error:
        return f"line {error.lineno}: {error.msg}"
      return None
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        return f"line {line_number}: {error.msg}"
      if not isinstance(row, dict):
        return f"line {line_number}: expected a JSON object, got {type(row).__name__}"
  return None


def _root_cause(error: BaseException) -> BaseException:
  seen = {id(error)}
  while True:
    cause = error.__cause__ or error.__context__
    if cause is None or id(cause) in seen:
      return error
    seen.add(id(cause))
    error = cause


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _load_hub_splits(config: ConfigDict,
                     splits: Sequence[str]) -> dict[str, datasets.Dataset]:
  name = config.dataset_name + (f" ({config.dataset_config})" if config.dataset_config else "")
  try:
    dataset_dict = datasets.load_dataset(config.dataset_name, config.dataset_config,
                                         cache_dir=config.cache_dir)
  except Exception as error:  # Hub, network and builder errors all end here.
    raise UserError(f"--dataset_name {name}: cannot load it: {_first_line(error)}") from error
  if not isinstance(dataset_dict, datasets.DatasetDict):
    raise UserError(f"--dataset_name {name}: expected a dataset with splits, "
                    f"got {type(dataset_dict).__name__}")
  missing = [split for split in splits if split not in dataset_dict]
  if missing:
    raise UserError(f"--dataset_name {name} has no {missing[0]!r} split (it has "
                    f"{', '.join(dataset_dict)}); pass --{FILE_KEY_FOR_SPLIT[missing[0]]}")
  for split in splits:
    if len(dataset_dict[split]) == 0:
      raise UserError(f"--dataset_name {name}: the {split!r} split has no rows")
  return {split: dataset_dict[split] for split in splits}


def resolve_columns(dataset: datasets.Dataset, config: ConfigDict,
                    split: str) -> tuple[str, str]:
  """(text_column, summary_column): the configured ones, else the first and second columns."""
  columns = dataset.column_names
  text_column = config.text_column or (columns[0] if columns else None)
  summary_column = config.summary_column or (columns[1] if len(columns) > 1 else None)
  if summary_column is None:
    raise UserError(f"the {split} data has only the columns {', '.join(columns) or '(none)'}; "
                    f"it needs a text and a summary column")
  for flag, column in (("--text_column", text_column), ("--summary_column", summary_column)):
    if column not in columns:
      raise UserError(f"{flag} {column!r} is not a column of the {split} data; available: "
                      f"{', '.join(columns)}")
  return text_column, summary_column


def _both_non_empty(texts: list[Any], summaries: list[Any]) -> list[bool]:
  return [isinstance(text, str) and bool(text.strip())
          and isinstance(summary, str) and bool(summary.strip())
          for text, summary in zip(texts, summaries)]


def _clean_split(dataset: datasets.Dataset, split: str,
                 config: ConfigDict) -> datasets.Dataset:
  text_column, summary_column = resolve_columns(dataset, config, split)
  num_rows = len(dataset)
  dataset = dataset.filter(
      _both_non_empty, input_columns=[text_column, summary_column], batched=True,
      num_proc=_num_proc(config, num_rows), load_from_cache_file=not config.overwrite_cache,
      desc=f"Dropping empty {split} rows")
  dropped = num_rows - len(dataset)
  if dropped:
    log.info("%s: dropped %d of %d rows with an empty or missing %s/%s", split, dropped,
                 num_rows, text_column, summary_column)
  if len(dataset) == 0:
    raise UserError(f"the {split} data has no row with a non-empty text in both "
                    f"{text_column!r} and {summary_column!r} ({num_rows} rows read)")

  max_key = MAX_SAMPLES_KEY_FOR_SPLIT[split]
  max_samples = getattr(config, max_key)
  if max_samples is not None:
    if max_samples > len(dataset):
      log.info("%s: --%s %d is more than the %d examples; using all of them", split,
                   max_key, max_samples, len(dataset))
    else:
      dataset = dataset.select(range(max_samples))
  return dataset


def _num_proc(config: ConfigDict, num_rows: int) -> int | None:
  workers = config.preprocessing_num_workers
  if not workers or workers <= 1:
    return None
  return min(workers, num_rows)


def describe_datasets(splits: Mapping[str, datasets.Dataset]) -> str:
  """One line for the log, e.g. 'train: 12,460 examples; validation: 200 examples'."""
  if not splits:
    return "no data"
  return "; ".join(f"{split}: {len(dataset):,} examples" for split, dataset in splits.items())


def references(dataset: datasets.Dataset, config: ConfigDict, split: str = "") -> list[str]:
  """The reference summaries of a raw split, in example_index order (for ROUGE)."""
  _, summary_column = resolve_columns(dataset, config, split or "reference")
  return dataset[summary_column]


# ----------------------------------------------------------------------------------------------
# Tokenization.


def tokenize_batch(texts: list[str], summaries: list[str], indices: list[int], *,
                    tokenizer: transformers.PreTrainedTokenizerBase, source_prefix: str,
                    max_source_length: int, max_target_length: int) -> dict[str, list[Any]]:
  inputs = tokenizer([source_prefix + text for text in texts], max_length=max_source_length,
                     truncation=True)
  targets = tokenizer(text_target=summaries, max_length=max_target_length, truncation=True)
  return {"input_ids": inputs["input_ids"], "labels": targets["input_ids"],
          "example_index": indices}


def long_sequence_note(config: ConfigDict, splits: Sequence[str],
                       model_max_length: int) -> str | None:
  """One line when the max lengths of `splits` exceed the length the tokenizer says its model
  was pretrained on (512 for T5; tokenizers without one report a huge number); else None."""
  lengths = {"--max_source_length": config.max_source_length}
  for split in splits:
    flag = "--max_target_length" if split == "train" else "--val_max_target_length"
    lengths[flag] = target_length(config, split)
  too_long = [f"{flag} {length}" for flag, length in lengths.items()
              if length > model_max_length]
  if not too_long:
    return None
  named = too_long[0] if len(too_long) == 1 else ", ".join(too_long[:-1]) + " and " + too_long[-1]
  verb = "is" if len(too_long) == 1 else "are"
  return (f"Note: {named} {verb} more than the {model_max_length} tokens the "
          "model was pretrained on; T5's relative positions accept any length, but attention "
          "memory grows with the square of the length")


def tokenize_datasets(raw_datasets: Mapping[str, datasets.Dataset],
                      tokenizer: transformers.PreTrainedTokenizerBase,
                      config: ConfigDict) -> dict[str, datasets.Dataset]:
  """Token ids per example (`input_ids`, `labels`, `example_index`), unpadded.

  Results are cached next to the raw data under the datasets fingerprint (data, tokenizer and
  settings), so a second run with the same inputs reads them back; overwrite_cache redoes them.
  """
  note = long_sequence_note(config, list(raw_datasets), tokenizer.model_max_length)
  if note is not None:
    log.info(note)
  tokenized = {}
  for split, dataset in raw_datasets.items():
    text_column, summary_column = resolve_columns(dataset, config, split)
    tokenized[split] = dataset.map(
        tokenize_batch,
        input_columns=[text_column, summary_column],
        with_indices=True,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "source_prefix": config.source_prefix or "",
                   "max_source_length": config.max_source_length,
                   "max_target_length": target_length(config, split)},
        remove_columns=dataset.column_names,
        features=TOKENIZED_FEATURES,
        num_proc=_num_proc(config, len(dataset)),
        load_from_cache_file=not config.overwrite_cache,
        desc=f"Tokenizing {split}")
  return tokenized


# ----------------------------------------------------------------------------------------------
# Batching.


@dataclasses.dataclass(frozen=True)
class TokenArrays:
  """One tokenized split as padded numpy arrays, built once and sliced per batch."""
  input_ids: np.ndarray  # [N, S] int32, PAD_TOKEN_ID after source_lengths.
  source_lengths: np.ndarray  # [N] int32
  labels: np.ndarray  # [N, T] int32, PAD_TOKEN_ID after target_lengths.
  target_lengths: np.ndarray  # [N] int32
  example_index: np.ndarray  # [N] int32

  def __len__(self) -> int:
    return len(self.example_index)


# What the batchers take: padded arrays, a tokenized datasets.Dataset, or a list of its rows.
BatchSource = TokenArrays | datasets.Dataset | Sequence[Mapping[str, Any]]


def _pad_token_lists(column: pa.ListArray | pa.LargeListArray,
                     length: int) -> tuple[np.ndarray, np.ndarray]:
  """A pyarrow list column as an [N, length] int32 array (cut at length) and the row lengths."""
  offsets = column.offsets.to_numpy().astype(np.int64)
  offsets -= offsets[0]
  values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
  row_lengths = np.diff(offsets)
  kept_lengths = np.minimum(row_lengths, length)
  if np.any(row_lengths > length):
    position_in_row = np.arange(len(values)) - np.repeat(offsets[:-1], row_lengths)
    values = values[position_in_row < length]
  padded = np.full((len(row_lengths), length), PAD_TOKEN_ID, dtype=np.int32)
  padded[np.arange(length)[None, :] < kept_lengths[:, None]] = values
  return padded, kept_lengths.astype(np.int32)


def to_arrays(dataset: datasets.Dataset, *, max_source_length: int,
              max_target_length: int) -> TokenArrays:
  """Pads a tokenized split to [N, max_source_length] and [N, max_target_length] arrays.

  Longer rows are cut (tokenize_datasets already truncates to the same lengths).
  """
  missing = {"input_ids", "labels", "example_index"} - set(dataset.column_names)
  if missing:
    raise ValueError(f"not a tokenized dataset: no {', '.join(sorted(missing))} column")
  table = dataset.with_format("arrow")[:]  # Respects any indices mapping from select/filter.
  input_ids, source_lengths = _pad_token_lists(table.column("input_ids").combine_chunks(),
                                               max_source_length)
  labels, target_lengths = _pad_token_lists(table.column("labels").combine_chunks(),
                                            max_target_length)
  example_index = table.column("example_index").to_numpy().astype(np.int32)
  return TokenArrays(input_ids=input_ids, source_lengths=source_lengths, labels=labels,
                     target_lengths=target_lengths, example_index=example_index)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches in one epoch (the last incomplete one is dropped)."""
  return num_examples // global_batch_size


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Batches needed to see every example once (the last one padded)."""
  return math.ceil(num_examples / global_batch_size)


def _as_arrays(data: BatchSource, max_source_length: int | None,
               max_target_length: int | None) -> TokenArrays:
  """Batchers take `to_arrays` output as it is; a dataset or a list of rows is padded here."""
  if isinstance(data, TokenArrays):
    return data
  if max_source_length is None or max_target_length is None:
    raise ValueError("batching a dataset needs max_source_length and max_target_length "
                     "(or pass to_arrays(...) output)")
  if not isinstance(data, datasets.Dataset):  # A list of tokenized example dicts.
    data = datasets.Dataset.from_list(
        [{key: example[key] for key in TOKENIZED_FEATURES} for example in data],
        features=TOKENIZED_FEATURES)
  return to_arrays(data, max_source_length=max_source_length,
                   max_target_length=max_target_length)


def _check_layout(per_device_batch_size: int, num_devices: int, process_index: int,
                  process_count: int) -> None:
  if per_device_batch_size <= 0 or num_devices <= 0:
    raise ValueError(f"per_device_batch_size ({per_device_batch_size}) and num_devices "
                     f"({num_devices}) must be positive")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")


@dataclasses.dataclass(frozen=True)
class LengthBuckets:
  """The static source and target lengths batches are padded to.

  A batch is padded to the shortest bucket that holds its longest row (on every process alike),
  so short data does not pay for max_source_length, and XLA compiles one program per bucket
  pair that occurs rather than one per batch.
  """
  source: tuple[int, ...]
  target: tuple[int, ...]

  @classmethod
  def evenly_spaced(cls, max_source_length: int, max_target_length: int,
                    count: int) -> "LengthBuckets":
    return cls(bucket_lengths(max_source_length, count), bucket_lengths(max_target_length, count))

  def fit(self, source_length: int, target_length: int) -> tuple[int, int]:
    pick = lambda buckets, length: next((b for b in buckets if b >= length), buckets[-1])
    return pick(self.source, source_length), pick(self.target, target_length)


def bucket_lengths(max_length: int, count: int) -> tuple[int, ...]:
  """`count` lengths spaced evenly up to max_length, rounded up to multiples of 8 (which suit
  the matmul units), the last being max_length itself."""
  if count < 1:
    raise UserError(f"--length_buckets must be at least 1, got {count}")
  round_up_to_8 = lambda n: math.ceil(n / 8) * 8
  lengths = {min(max_length, round_up_to_8(max_length * i / count)) for i in range(1, count)}
  return tuple(sorted(lengths | {max_length}))


def group_by_length(order: np.ndarray, source_lengths: np.ndarray, global_batch_size: int,
                    megabatch_batches: int = 50) -> np.ndarray:
  """`order` with each run of `megabatch_batches` global batches sorted longest first, as the
  Hugging Face Trainer's --group_by_length does: batches of similar lengths, still shuffled
  across the epoch."""
  grouped = order.copy()
  size = megabatch_batches * global_batch_size
  for start in range(0, len(order), size):
    chunk = order[start:start + size]
    grouped[start:start + size] = chunk[np.argsort(-source_lengths[chunk], kind="stable")]
  return grouped


def _padded_widths(arrays: TokenArrays, global_rows: np.ndarray,
                   buckets: LengthBuckets | None) -> tuple[int, int]:
  """The batch's (source, target) widths: the arrays' full widths, or the bucket that fits the
  longest of the global batch's rows (so every process pads its slice alike)."""
  if buckets is None:
    return arrays.input_ids.shape[1], arrays.labels.shape[1]
  real = global_rows[global_rows >= 0]
  longest_source = int(arrays.source_lengths[real].max(initial=1))
  longest_target = int(arrays.target_lengths[real].max(initial=1))
  return buckets.fit(longest_source, longest_target)


def _make_batch(arrays: TokenArrays, rows: np.ndarray, num_devices: int,
                decoder_start_token_id: int,
                widths: tuple[int, int] | None = None) -> Batch:
  """Gathers `rows` (-1 = padding row) into a batch shaped [num_devices, per_device, ...],
  padded to `widths` (source, target; default: the arrays' widths)."""
  source_width, target_width = widths or (arrays.input_ids.shape[1], arrays.labels.shape[1])
  is_real = rows >= 0
  safe_rows = np.where(is_real, rows, 0)
  source_lengths = np.where(is_real, arrays.source_lengths[safe_rows], 0)
  target_lengths = np.where(is_real, arrays.target_lengths[safe_rows], 0)
  attention_mask = (np.arange(source_width)[None, :] < source_lengths[:, None]).astype(np.int32)
  decoder_attention_mask = (np.arange(target_width)[None, :]
                            < target_lengths[:, None]).astype(np.int32)
  input_ids = arrays.input_ids[safe_rows, :source_width] * attention_mask
  labels = arrays.labels[safe_rows, :target_width] * decoder_attention_mask
  decoder_input_ids = np.empty_like(labels)
  decoder_input_ids[:, 0] = decoder_start_token_id
  decoder_input_ids[:, 1:] = labels[:, :-1]
  batch = {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "decoder_input_ids": decoder_input_ids,
      "labels": labels,
      "decoder_attention_mask": decoder_attention_mask,
      "example_index": np.where(is_real, arrays.example_index[safe_rows], -1).astype(np.int32),
  }
  return {key: value.reshape(num_devices, -1, *value.shape[1:]) for key, value in batch.items()}


def train_batches(data: BatchSource, *, seed: int, epoch: int,
                  per_device_batch_size: int, num_devices: int,
                  max_source_length: int | None = None, max_target_length: int | None = None,
                  start_batch: int = 0, process_index: int = 0, process_count: int = 1,
                  decoder_start_token_id: int = DECODER_START_TOKEN_ID,
                  buckets: LengthBuckets | None = None,
                  grouped_by_length: bool = False) -> Iterator[Batch]:
  """This process's share of one shuffled training epoch.

  The order depends only on (seed, epoch) (and, grouped by length, on the lengths). Each global
  batch (per_device_batch_size * num_devices * process_count rows) is cut into contiguous
  per-process slices; the last incomplete global batch is dropped. Batches before
  `start_batch` are skipped without work. With `buckets`, each batch is padded to the bucket
  that fits its longest row rather than to the arrays' widths.
  """
  _check_layout(per_device_batch_size, num_devices, process_index, process_count)
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}")
  arrays = _as_arrays(data, max_source_length, max_target_length)
  local_batch_size = per_device_batch_size * num_devices
  global_batch_size = local_batch_size * process_count
  num_batches = steps_per_epoch(len(arrays), global_batch_size)
  if num_batches == 0:
    raise UserError(f"the training data has {len(arrays)} examples, fewer than one global "
                    f"batch of {global_batch_size}; lower --per_device_train_batch_size")
  order = np.random.default_rng([seed, epoch]).permutation(len(arrays))
  if grouped_by_length:
    order = group_by_length(order, arrays.source_lengths, global_batch_size)

  def batches() -> Iterator[Batch]:
    for batch_number in range(start_batch, num_batches):
      global_rows = order[batch_number * global_batch_size:
                          (batch_number + 1) * global_batch_size]
      local_rows = global_rows[process_index * local_batch_size:
                               (process_index + 1) * local_batch_size]
      yield _make_batch(arrays, local_rows, num_devices, decoder_start_token_id,
                        _padded_widths(arrays, global_rows, buckets))

  return batches()


def eval_batches(data: BatchSource, *, per_device_batch_size: int,
                 num_devices: int, max_source_length: int | None = None,
                 max_target_length: int | None = None, process_index: int = 0,
                 process_count: int = 1,
                 decoder_start_token_id: int = DECODER_START_TOKEN_ID,
                 buckets: LengthBuckets | None = None) -> Iterator[Batch]:
  """This process's share of every example once, in dataset order.

  The last global batch is filled with padding rows (all masks 0, example_index -1), so every
  process runs the same number of batches. `buckets` pads as in `train_batches`.
  """
  _check_layout(per_device_batch_size, num_devices, process_index, process_count)
  arrays = _as_arrays(data, max_source_length, max_target_length)
  local_batch_size = per_device_batch_size * num_devices
  global_batch_size = local_batch_size * process_count
  num_examples = len(arrays)

  def batches() -> Iterator[Batch]:
    for batch_number in range(num_eval_batches(num_examples, global_batch_size)):
      global_rows = np.arange(batch_number * global_batch_size,
                              (batch_number + 1) * global_batch_size)
      global_rows[global_rows >= num_examples] = -1
      local_rows = global_rows[process_index * local_batch_size:
                               (process_index + 1) * local_batch_size]
      yield _make_batch(arrays, local_rows, num_devices, decoder_start_token_id,
                        _padded_widths(arrays, global_rows, buckets))

  return batches()


@dataclasses.dataclass(frozen=True)
class _End:
  """What `in_background`'s thread queues after the last item: the error it raised, if any."""
  error: BaseException | None


def in_background(items: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """`items` produced up to `size` ahead on a daemon thread (numpy releases the GIL while it
  gathers and pads), so the step loop does not wait for its next batch. An exception raised
  by `items` is raised here; closing the returned generator stops the thread."""
  ready: queue.Queue = queue.Queue(maxsize=size)
  stopped = threading.Event()

  def put(item) -> bool:
    while not stopped.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
    except BaseException as error:  # Handed to the consumer, which raises it.
      put(_End(error))
      return
    put(_End(None))

  threading.Thread(target=produce, daemon=True, name="batches").start()
  try:
    while True:
      item = ready.get()
      if isinstance(item, _End):
        if item.error is not None:
          raise item.error
        return
      yield item
  finally:
    stopped.set()
