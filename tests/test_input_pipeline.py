"""Tests for flax_sum.input_pipeline: loading, cleaning, tokenization, caching and batching."""

import json
import logging
import os
import pathlib
import subprocess
import sys
from unittest import mock

import datasets
import numpy as np
import pytest

from flax_sum import config as config_lib
from flax_sum import input_pipeline
from flax_sum.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EOS = 1

ROWS = [
    {"id": "a", "body": "the cat sat on the mat", "tldr": "hello world"},
    {"id": "b", "body": "hello world", "tldr": "short"},
    {"id": "c", "body": "a b c d e f g", "tldr": "the cat sat on the mat"},
]


@pytest.fixture(scope="module")
def tokenizer():
  return input_pipeline.load_tokenizer(config_lib.base_config())


def make_config(tmp_path, **overrides):
  config = config_lib.base_config()
  config.cache_dir = str(tmp_path / "hf_cache")
  for key, value in overrides.items():
    config[key] = value
  return config


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def write_csv(path, header, rows):
  lines = [",".join(header)] + [",".join(row) for row in rows]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def tokenized_dataset(input_ids, labels):
  return datasets.Dataset.from_dict(
      {"input_ids": input_ids, "labels": labels, "example_index": list(range(len(input_ids)))},
      features=input_pipeline.TOKENIZED_FEATURES)


def synthetic_arrays(num_examples, source_length=6, target_length=4):
  """Example i has source [i+2] * (i % 3 + 1) + [EOS] and labels [i+2, EOS]."""
  input_ids = [[i + 2] * (i % 3 + 1) + [EOS] for i in range(num_examples)]
  labels = [[i + 2, EOS] for i in range(num_examples)]
  return input_pipeline.to_arrays(tokenized_dataset(input_ids, labels),
                                  max_source_length=source_length,
                                  max_target_length=target_length)


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def test_bundled_tokenizer_has_the_full_t5_vocabulary(tokenizer):
  assert len(tokenizer) == 32100
  assert tokenizer.pad_token_id == 0
  assert tokenizer.eos_token_id == EOS
  assert tokenizer("summarize: hello world")["input_ids"] == [21603, 10, 21820, 296, 1]


def test_tokenizer_falls_back_from_config_dir_without_tokenizer_files():
  config = config_lib.base_config()
  config.config_name = str(config_lib.ASSETS_DIR / "t5-mini" / "config.json")
  assert len(input_pipeline.load_tokenizer(config)) == 32100


def test_tokenizer_from_saved_directory(tmp_path, tokenizer):
  tokenizer.save_pretrained(str(tmp_path / "model"))
  config = make_config(tmp_path, model_name_or_path=str(tmp_path / "model"))
  loaded = input_pipeline.load_tokenizer(config)
  assert len(loaded) == 32100
  assert loaded("hello world")["input_ids"] == [21820, 296, 1]


def test_tokenizer_missing_is_a_user_error(tmp_path):
  missing = tmp_path / "no_such_dir"
  with pytest.raises(UserError, match=r"--tokenizer_name .*no_such_dir: not a directory; "
                     r"expected a directory holding spiece.model or tokenizer.json"):
    input_pipeline.load_tokenizer(make_config(tmp_path, tokenizer_name=str(missing)))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match=r"--model_name_or_path .*empty: no tokenizer found; "
                     r"expected spiece.model or tokenizer.json or tokenizer_config.json"):
    input_pipeline.load_tokenizer(
        make_config(tmp_path, model_name_or_path=str(tmp_path / "empty")))


# ----------------------------------------------------------------------------------------------
# Loading and cleaning.


def test_columns_default_to_the_first_two(tmp_path):
  train_file = write_csv(tmp_path / "train.csv", ["article", "highlights", "id"],
                         [["doc one", "sum one", "1"], ["doc two", "sum two", "2"]])
  raw = input_pipeline.load_raw_datasets(make_config(tmp_path, train_file=train_file,
                                                     do_train=True))
  assert list(raw) == ["train"]
  config = make_config(tmp_path)
  assert input_pipeline.resolve_columns(raw["train"], config, "train") == ("article",
                                                                           "highlights")
  assert raw["train"]["article"] == ["doc one", "doc two"]


def test_explicit_columns_and_all_modes(tmp_path, tokenizer):
  config = make_config(
      tmp_path, do_train=True, do_eval=True, do_predict=True, text_column="body",
      summary_column="tldr", train_file=write_jsonl(tmp_path / "train.jsonl", ROWS),
      validation_file=str(tmp_path / "validation.json"),
      test_file=write_csv(tmp_path / "test.csv", ["tldr", "body"], [["s", "t"]]))
  (tmp_path / "validation.json").write_text(json.dumps(ROWS[:2]))  # A JSON array.
  raw = input_pipeline.load_raw_datasets(config)
  assert {split: len(ds) for split, ds in raw.items()} == {"train": 3, "validation": 2,
                                                           "test": 1}
  assert raw["train"]["body"] == [row["body"] for row in ROWS]
  assert raw["test"]["body"] == ["t"]
  assert input_pipeline.describe_datasets(raw) == (
      "train: 3 examples; validation: 2 examples; test: 1 examples")


def test_missing_column_lists_the_available_ones(tmp_path):
  config = make_config(tmp_path, do_train=True, text_column="dialog", summary_column="tldr",
                       train_file=write_jsonl(tmp_path / "train.jsonl", ROWS))
  with pytest.raises(UserError, match=r"^--text_column 'dialog' is not a column of the train "
                     r"data; available: id, body, tldr$"):
    input_pipeline.load_raw_datasets(config)


def test_empty_and_missing_rows_are_dropped_and_counted(tmp_path, caplog):
  rows = [
      {"id": "0", "body": "keep me", "tldr": "yes"},
      {"id": "1", "body": None, "tldr": "no text"},
      {"id": "2", "body": "no summary", "tldr": ""},
      {"id": "3", "body": "   \n", "tldr": "blank text"},
      {"id": "4", "body": "summary missing"},
      {"id": "5", "body": "keep me too", "tldr": "ok"},
  ]
  config = make_config(tmp_path, do_eval=True, text_column="body", summary_column="tldr",
                       validation_file=write_jsonl(tmp_path / "v.jsonl", rows))
  with caplog.at_level(logging.INFO, logger="flax_sum.input_pipeline"):
    raw = input_pipeline.load_raw_datasets(config)
  assert raw["validation"]["id"] == ["0", "5"]
  assert "validation: dropped 4 of 6 rows with an empty or missing body/tldr" in caplog.text


def test_empty_csv_cells_are_dropped(tmp_path):
  train_file = write_csv(tmp_path / "t.csv", ["text", "summary"],
                         [["one", "s1"], ["", "s2"], ["three", ""], ["four", "s4"]])
  raw = input_pipeline.load_raw_datasets(make_config(tmp_path, do_train=True,
                                                     train_file=train_file))
  assert raw["train"]["text"] == ["one", "four"]


def test_no_usable_rows_is_a_user_error(tmp_path):
  rows = [{"body": "", "tldr": "x"}, {"body": "y", "tldr": None}]
  config = make_config(tmp_path, do_train=True,
                       train_file=write_jsonl(tmp_path / "t.jsonl", rows))
  with pytest.raises(UserError, match=r"the train data has no row with a non-empty text in "
                     r"both 'body' and 'tldr' \(2 rows read\)"):
    input_pipeline.load_raw_datasets(config)


def test_max_samples_takes_the_first_good_rows(tmp_path, caplog):
  rows = [{"body": f"text {i}", "tldr": "" if i == 1 else f"sum {i}"} for i in range(6)]
  path = write_jsonl(tmp_path / "t.jsonl", rows)
  raw = input_pipeline.load_raw_datasets(make_config(tmp_path, do_train=True, train_file=path,
                                                     max_train_samples=3))
  assert raw["train"]["body"] == ["text 0", "text 2", "text 3"]

  with caplog.at_level(logging.INFO, logger="flax_sum.input_pipeline"):
    raw = input_pipeline.load_raw_datasets(
        make_config(tmp_path, do_predict=True, test_file=path, max_predict_samples=100))
  assert len(raw["test"]) == 5
  assert "test: --max_predict_samples 100 is more than the 5 examples" in caplog.text

  for bad in (0, -2):
    with pytest.raises(UserError, match=rf"^--max_eval_samples must be positive, got {bad}$"):
      input_pipeline.load_raw_datasets(make_config(tmp_path, do_eval=True,
                                                   validation_file=path, max_eval_samples=bad))


def test_mode_without_data_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match=r"^--do_eval needs validation data: pass "
                     r"--validation_file or --dataset_name$"):
    input_pipeline.load_raw_datasets(make_config(tmp_path, do_eval=True))
  assert input_pipeline.load_raw_datasets(make_config(tmp_path)) == {}


def test_local_files_win_over_the_hub_dataset(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", ROWS)
  config = make_config(tmp_path, do_train=True, train_file=path,
                       dataset_name="no-such-owner/no-such-dataset")
  assert len(input_pipeline.load_raw_datasets(config)["train"]) == 3
  config.do_eval = True  # No validation_file: this split must come from the (unreachable) Hub.
  with pytest.raises(UserError, match=r"^--dataset_name no-such-owner/no-such-dataset: cannot "
                     r"load it: "):
    input_pipeline.load_raw_datasets(config)


@pytest.mark.parametrize("name, line", [("latin1.jsonl", 2), ("latin1.csv", 3),
                                        ("latin1.json", 2)])
def test_non_utf8_bytes_are_a_user_error_naming_the_line(tmp_path, name, line):
  path = tmp_path / name
  good, bad = "caf\u00e9".encode("utf-8"), "caf\u00e9".encode("latin-1")
  if name.endswith(".csv"):
    path.write_bytes(b"text,summary\n" + good + b",ok\n" + b"x," + bad + b"\n")
  elif name.endswith(".jsonl"):
    path.write_bytes(b'{"text": "' + good + b'", "summary": "s"}\n{"text": "' + bad
                     + b'", "summary": "s"}\n')
  else:
    path.write_bytes(b'[{"text": "a", "summary": "s"},\n {"text": "' + bad
                     + b'", "summary": "s"}]')
  with pytest.raises(UserError, match=rf"^--train_file .*{name}: line {line} is not UTF-8 \(byte "
                     r"0xe9 at byte \d+ of the line\); save the file as UTF-8 text$"):
    input_pipeline.load_raw_datasets(make_config(tmp_path, do_train=True, train_file=str(path)))


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, r"--train_file .*missing.jsonl: no such file$"),
    ("data.txt", "a,b\n", r"--train_file .*data.txt: unsupported extension '.txt'; use one of "
     r".csv, .json, .jsonl$"),
    ("empty.csv", "", r"--train_file .*empty.csv: the file is empty$"),
    ("blank.jsonl", "\n  \n", r"--train_file .*blank.jsonl: the file is empty$"),
    ("header_only.csv", "text,summary\n", r"--train_file .*header_only.csv: the file has no "
     r"rows$"),
    ("empty_array.json", "[]", r"--train_file .*empty_array.json: the file has no rows$"),
    ("bad.jsonl", '{"a": "x", "b": "y"}\n{"a": "x", "b": \n', r"--train_file .*bad.jsonl: "
     r"cannot parse it: line 2: Expecting value$"),
    ("bad.json", '[{"a": "x", "b": "y"},\n {"a": }]', r"--train_file .*bad.json: cannot parse "
     r"it: line 2: Expecting value$"),
    ("bad.csv", "a,b\nx,y\nx,y,z\n", r"--train_file .*bad.csv: cannot parse it: .*"
     r"Expected 2 fields in line 3, saw 3"),
])
def test_bad_files_are_user_errors(tmp_path, name, content, message):
  path = tmp_path / name
  if content is not None:
    path.write_text(content)
  with pytest.raises(UserError, match=message):
    input_pipeline.load_raw_datasets(make_config(tmp_path, do_train=True, train_file=str(path)))


def test_bundled_dialogsum_loads(tmp_path, tokenizer):
  config = make_config(tmp_path, do_train=True, text_column="dialogue",
                       summary_column="summary", max_train_samples=4,
                       train_file=str(config_lib.BUNDLED_DIALOGSUM_DIR / "train.jsonl"))
  raw = input_pipeline.load_raw_datasets(config)
  assert raw["train"].column_names == ["id", "dialogue", "summary"]
  assert raw["train"]["id"] == ["train_0", "train_1", "train_2", "train_3"]
  assert raw["train"]["dialogue"][0].startswith("#Person1#: Hi, Mr. Smith.")
  tokenized = input_pipeline.tokenize_datasets(raw, tokenizer, config)
  assert tokenized["train"]["example_index"] == [0, 1, 2, 3]
  assert all(len(ids) <= 1024 and ids[-1] == EOS for ids in tokenized["train"]["input_ids"])


# ----------------------------------------------------------------------------------------------
# Tokenization and caching.


def test_tokenization_prefix_truncation_and_lengths(tmp_path, tokenizer):
  config = make_config(
      tmp_path, do_train=True, do_eval=True, text_column="body", summary_column="tldr",
      source_prefix="summarize: ", max_source_length=5, max_target_length=3,
      val_max_target_length=6, train_file=write_jsonl(tmp_path / "train.jsonl", ROWS),
      validation_file=write_jsonl(tmp_path / "validation.jsonl", ROWS))
  raw = input_pipeline.load_raw_datasets(config)
  tokenized = input_pipeline.tokenize_datasets(raw, tokenizer, config)
  train = tokenized["train"]
  assert train.column_names == ["input_ids", "labels", "example_index"]
  # "summarize: the cat sat ..." truncated to 5 tokens, EOS kept at the end.
  assert train["input_ids"] == [[21603, 10, 8, 1712, EOS], [21603, 10, 21820, 296, EOS],
                                [21603, 10, 3, 9, EOS]]
  assert train["labels"] == [[21820, 296, EOS], [710, EOS], [8, 1712, EOS]]
  assert tokenized["validation"]["labels"] == [[21820, 296, EOS], [710, EOS],
                                               [8, 1712, 3, 7, 144, EOS]]
  assert train["example_index"] == [0, 1, 2]


NOTE_END = ("tokens the model was pretrained on; T5's relative positions accept any length, but "
            "attention memory grows with the square of the length")


@pytest.mark.parametrize("model_max_length, lengths, note", [
    (512, {"max_source_length": 512, "max_target_length": 128}, None),
    (512, {"max_source_length": 1024, "max_target_length": 128},
     f"Note: --max_source_length 1024 is more than the 512 {NOTE_END}"),
    (512, {"max_source_length": 1024, "max_target_length": 600, "val_max_target_length": 700},
     "Note: --max_source_length 1024, --max_target_length 600 and --val_max_target_length 700 "
     f"are more than the 512 {NOTE_END}"),
    # The bundled tokenizer names no length (transformers reports a huge number): no note.
    (None, {"max_source_length": 4096, "max_target_length": 128}, None),
])
def test_lengths_beyond_the_pretrained_length_get_one_note(tmp_path, tokenizer, caplog,
                                                           monkeypatch, model_max_length,
                                                           lengths, note):
  if model_max_length is not None:
    monkeypatch.setattr(tokenizer, "model_max_length", model_max_length)
  config = make_config(tmp_path, do_train=True, do_eval=True, text_column="body",
                       summary_column="tldr", **lengths,
                       train_file=write_jsonl(tmp_path / "train.jsonl", ROWS),
                       validation_file=write_jsonl(tmp_path / "validation.jsonl", ROWS))
  raw = input_pipeline.load_raw_datasets(config)
  with caplog.at_level(logging.INFO, logger="flax_sum.input_pipeline"):
    input_pipeline.tokenize_datasets(raw, tokenizer, config)
  notes = [record.getMessage() for record in caplog.records if "pretrained" in record.getMessage()]
  assert notes == ([note] if note else [])


def _cache_files(dataset):
  return [entry["filename"] for entry in dataset.cache_files]


def test_tokenization_is_cached(tmp_path, tokenizer):
  config = make_config(tmp_path, do_train=True, text_column="body", summary_column="tldr",
                       train_file=write_jsonl(tmp_path / "train.jsonl", ROWS))
  first = input_pipeline.tokenize_datasets(input_pipeline.load_raw_datasets(config), tokenizer,
                                           config)["train"]
  tokenizer_type = type(tokenizer)
  with mock.patch.object(tokenizer_type, "__call__", autospec=True,
                         side_effect=tokenizer_type.__call__) as tokenize_call:
    # A fresh tokenizer object and fresh raw data, as in a second run.
    second = input_pipeline.tokenize_datasets(
        input_pipeline.load_raw_datasets(config), input_pipeline.load_tokenizer(config),
        config)["train"]
    assert tokenize_call.call_count == 0
    assert _cache_files(second) == _cache_files(first)
    assert second["input_ids"] == first["input_ids"]

    config.overwrite_cache = True
    input_pipeline.tokenize_datasets(input_pipeline.load_raw_datasets(config), tokenizer,
                                     config)
    assert tokenize_call.call_count == 2  # Sources and targets, one batch.


def test_tokenization_cache_is_reused_by_a_new_process(tmp_path, tokenizer):
  config = make_config(tmp_path, do_train=True, text_column="body", summary_column="tldr",
                       source_prefix="summarize: ",
                       train_file=write_jsonl(tmp_path / "train.jsonl", ROWS))
  first = input_pipeline.tokenize_datasets(input_pipeline.load_raw_datasets(config), tokenizer,
                                           config)["train"]
  [cache_file] = _cache_files(first)
  modified = os.stat(cache_file).st_mtime_ns
  config_file = tmp_path / "config.json"
  config_file.write_text(json.dumps(config.to_dict()))
  script = """
import json, sys
from flax_sum import config as config_lib, input_pipeline
config = config_lib.base_config()
for key, value in json.loads(open(sys.argv[1]).read()).items():
  config[key] = value
raw = input_pipeline.load_raw_datasets(config)
tokenized = input_pipeline.tokenize_datasets(raw, input_pipeline.load_tokenizer(config), config)
print(json.dumps([entry["filename"] for entry in tokenized["train"].cache_files]))
"""
  result = subprocess.run([sys.executable, "-c", script, str(config_file)], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == [cache_file]
  assert os.stat(cache_file).st_mtime_ns == modified


# ----------------------------------------------------------------------------------------------
# Arrays and batches.


def test_to_arrays_pads_and_cuts():
  dataset = tokenized_dataset([[5, 6, EOS], [7, EOS], [8, 9, 10, 11, EOS]],
                              [[4, EOS], [3, 3, 3, EOS], []])
  arrays = input_pipeline.to_arrays(dataset.select([2, 0, 1]), max_source_length=4,
                                    max_target_length=3)
  np.testing.assert_array_equal(arrays.input_ids, [[8, 9, 10, 11], [5, 6, EOS, 0],
                                                   [7, EOS, 0, 0]])
  np.testing.assert_array_equal(arrays.source_lengths, [4, 3, 2])
  np.testing.assert_array_equal(arrays.labels, [[0, 0, 0], [4, EOS, 0], [3, 3, 3]])
  np.testing.assert_array_equal(arrays.target_lengths, [0, 2, 3])
  np.testing.assert_array_equal(arrays.example_index, [2, 0, 1])
  assert arrays.input_ids.dtype == np.int32 and arrays.labels.dtype == np.int32


def test_batch_shapes_dtypes_masks_and_shift_right():
  arrays = synthetic_arrays(8)
  [batch] = list(input_pipeline.eval_batches(arrays, per_device_batch_size=2, num_devices=4))
  expected_shapes = {"input_ids": (4, 2, 6), "attention_mask": (4, 2, 6),
                     "decoder_input_ids": (4, 2, 4), "labels": (4, 2, 4),
                     "decoder_attention_mask": (4, 2, 4), "example_index": (4, 2)}
  assert {key: value.shape for key, value in batch.items()} == expected_shapes
  assert all(value.dtype == np.int32 for value in batch.values())
  # Example 4 sits on device 2, row 0: source [6, 6, EOS], labels [6, EOS].
  np.testing.assert_array_equal(batch["input_ids"][2, 0], [6, 6, EOS, 0, 0, 0])
  np.testing.assert_array_equal(batch["attention_mask"][2, 0], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["labels"][2, 0], [6, EOS, 0, 0])
  np.testing.assert_array_equal(batch["decoder_input_ids"][2, 0], [0, 6, EOS, 0])
  np.testing.assert_array_equal(batch["decoder_attention_mask"][2, 0], [1, 1, 0, 0])
  np.testing.assert_array_equal(batch["example_index"], [[0, 1], [2, 3], [4, 5], [6, 7]])


def test_shift_right_keeps_the_last_label_out_of_a_full_row():
  arrays = input_pipeline.to_arrays(tokenized_dataset([[5, EOS]], [[7, 8, 9, EOS]]),
                                    max_source_length=2, max_target_length=4)
  [batch] = list(input_pipeline.eval_batches(arrays, per_device_batch_size=1, num_devices=1))
  np.testing.assert_array_equal(batch["decoder_input_ids"], [[[0, 7, 8, 9]]])
  np.testing.assert_array_equal(batch["labels"], [[[7, 8, 9, EOS]]])
  np.testing.assert_array_equal(batch["decoder_attention_mask"], [[[1, 1, 1, 1]]])


@pytest.mark.parametrize("per_device, devices, processes", [
    (2, 4, 1), (1, 3, 1), (1, 7, 1), (2, 2, 2), (1, 3, 2), (4, 1, 3)])
def test_eval_batches_cover_every_example_once(per_device, devices, processes):
  arrays = synthetic_arrays(7)
  global_batch = per_device * devices * processes
  num_batches = input_pipeline.num_eval_batches(7, global_batch)
  seen = []
  for batch_parts in zip(*[
      input_pipeline.eval_batches(arrays, per_device_batch_size=per_device, num_devices=devices,
                                  process_index=p, process_count=processes)
      for p in range(processes)]):
    num_batches -= 1
    for batch in batch_parts:
      assert batch["input_ids"].shape == (devices, per_device, 6)
      rows = batch["example_index"].reshape(-1)
      seen.extend(rows[rows >= 0].tolist())
      padding = batch["example_index"] == -1
      for key in ("input_ids", "attention_mask", "decoder_input_ids", "labels",
                  "decoder_attention_mask"):
        assert not batch[key][padding].any(), key
      assert batch["attention_mask"][~padding].any(axis=-1).all()
  assert num_batches == 0
  assert seen == list(range(7))  # Dataset order, each example once.


def test_eval_padding_rows_of_the_last_batch():
  batches = list(input_pipeline.eval_batches(synthetic_arrays(7), per_device_batch_size=2,
                                             num_devices=2))
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[1]["example_index"], [[4, 5], [6, -1]])
  np.testing.assert_array_equal(batches[1]["attention_mask"][1, 1], np.zeros(6))
  np.testing.assert_array_equal(batches[1]["decoder_attention_mask"][1, 1], np.zeros(4))


def _train_order(arrays, **kwargs):
  return [batch["example_index"] for batch in input_pipeline.train_batches(arrays, **kwargs)]


def test_train_order_depends_only_on_seed_and_epoch():
  arrays = synthetic_arrays(10)
  layout = {"per_device_batch_size": 2, "num_devices": 2}
  epoch0 = _train_order(arrays, seed=3, epoch=0, **layout)
  assert len(epoch0) == input_pipeline.steps_per_epoch(10, 4) == 2  # 2 examples dropped.
  np.testing.assert_array_equal(epoch0, _train_order(arrays, seed=3, epoch=0, **layout))
  expected = np.random.default_rng([3, 0]).permutation(10)[:8].reshape(2, 2, 2)
  np.testing.assert_array_equal(epoch0, expected)
  assert not np.array_equal(epoch0, _train_order(arrays, seed=3, epoch=1, **layout))
  assert not np.array_equal(epoch0, _train_order(arrays, seed=4, epoch=0, **layout))
  assert len(set(np.concatenate(epoch0, axis=None).tolist())) == 8


def test_train_processes_split_the_global_batch():
  arrays = synthetic_arrays(20)
  single = list(input_pipeline.train_batches(arrays, seed=0, epoch=2, per_device_batch_size=2,
                                             num_devices=4))
  per_process = [
      list(input_pipeline.train_batches(arrays, seed=0, epoch=2, per_device_batch_size=2,
                                        num_devices=2, process_index=p, process_count=2))
      for p in range(2)]
  assert len(single) == len(per_process[0]) == len(per_process[1]) == 2
  for whole, part0, part1 in zip(single, *per_process):
    rows0 = set(part0["example_index"].ravel().tolist())
    rows1 = set(part1["example_index"].ravel().tolist())
    assert not rows0 & rows1
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part0[key], part1[key]]), whole[key])


def test_train_start_batch_skips_batches():
  arrays = synthetic_arrays(30)
  layout = {"seed": 1, "epoch": 0, "per_device_batch_size": 1, "num_devices": 4}
  full = list(input_pipeline.train_batches(arrays, **layout))
  resumed = list(input_pipeline.train_batches(arrays, start_batch=5, **layout))
  assert len(full) == 7 and len(resumed) == 2
  for expected, actual in zip(full[5:], resumed):
    for key in expected:
      np.testing.assert_array_equal(actual[key], expected[key])
  assert list(input_pipeline.train_batches(arrays, start_batch=7, **layout)) == []


def test_train_batches_need_one_full_global_batch():
  with pytest.raises(UserError, match=r"the training data has 3 examples, fewer than one "
                     r"global batch of 8"):
    input_pipeline.train_batches(synthetic_arrays(3), seed=0, epoch=0,
                                 per_device_batch_size=1, num_devices=8)


def test_batches_from_a_dataset_match_batches_from_arrays(tmp_path, tokenizer):
  config = make_config(tmp_path, do_train=True, text_column="body", summary_column="tldr",
                       max_source_length=8, max_target_length=4,
                       train_file=write_jsonl(tmp_path / "train.jsonl", ROWS * 4))
  dataset = input_pipeline.tokenize_datasets(input_pipeline.load_raw_datasets(config),
                                             tokenizer, config)["train"]
  arrays = input_pipeline.to_arrays(dataset, max_source_length=8, max_target_length=4)
  layout = {"seed": 0, "epoch": 0, "per_device_batch_size": 2, "num_devices": 2}
  from_dataset = list(input_pipeline.train_batches(dataset, max_source_length=8,
                                                   max_target_length=4, **layout))
  from_arrays = list(input_pipeline.train_batches(arrays, **layout))
  assert len(from_dataset) == 3
  for a, b in zip(from_dataset, from_arrays):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(ValueError, match="needs max_source_length and max_target_length"):
    input_pipeline.train_batches(dataset, **layout)


def test_batches_from_a_list_of_examples_and_from_arrays_padded_once():
  examples = [{"input_ids": [i + 2, EOS], "labels": [i + 2, i + 3, EOS], "example_index": i}
              for i in range(5)]
  [batch] = list(input_pipeline.eval_batches(examples, per_device_batch_size=3, num_devices=2,
                                             max_source_length=3, max_target_length=3))
  np.testing.assert_array_equal(batch["example_index"], [[0, 1, 2], [3, 4, -1]])
  np.testing.assert_array_equal(batch["input_ids"][1, 1], [6, EOS, 0])
  np.testing.assert_array_equal(batch["decoder_input_ids"][1, 1], [0, 6, 7])

  # The trainer pads each split once with to_arrays; batching those arrays pads nothing again.
  dataset = tokenized_dataset([ex["input_ids"] for ex in examples],
                              [ex["labels"] for ex in examples])
  arrays = input_pipeline.to_arrays(dataset, max_source_length=4, max_target_length=4)
  with mock.patch.object(input_pipeline, "to_arrays",
                         side_effect=input_pipeline.to_arrays) as to_arrays:
    from_arrays = [list(input_pipeline.train_batches(
        arrays, seed=0, epoch=epoch, per_device_batch_size=1, num_devices=2))
                   for epoch in range(3)]
    assert to_arrays.call_count == 0
  for epoch, batches in enumerate(from_arrays):
    from_dataset = input_pipeline.train_batches(
        dataset, seed=0, epoch=epoch, per_device_batch_size=1, num_devices=2,
        max_source_length=4, max_target_length=4)
    for a, b in zip(batches, from_dataset, strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_references_are_the_raw_summaries(tmp_path):
  config = make_config(tmp_path, do_eval=True, text_column="body", summary_column="tldr",
                       validation_file=write_jsonl(tmp_path / "v.jsonl", ROWS),
                       max_eval_samples=2)
  raw = input_pipeline.load_raw_datasets(config)
  assert input_pipeline.references(raw["validation"], config) == ["hello world", "short"]


# ----------------------------------------------------------------------------------------------
# Length buckets and grouping.


def varied_arrays(num_examples, source_length=64, target_length=16, seed=0):
  """Random token rows with source lengths 1..source_length and target lengths 2..target_length."""
  rng = np.random.default_rng(seed)
  input_ids = [rng.integers(2, 100, rng.integers(1, source_length + 1)).tolist()
               for _ in range(num_examples)]
  labels = [rng.integers(2, 100, rng.integers(2, target_length + 1)).tolist()
            for _ in range(num_examples)]
  return input_pipeline.to_arrays(tokenized_dataset(input_ids, labels),
                                  max_source_length=source_length,
                                  max_target_length=target_length)


def test_bucket_lengths_are_even_multiples_of_8_up_to_the_max():
  assert input_pipeline.bucket_lengths(256, 4) == (64, 128, 192, 256)
  assert input_pipeline.bucket_lengths(48, 4) == (16, 24, 40, 48)
  assert input_pipeline.bucket_lengths(100, 3) == (40, 72, 100)
  assert input_pipeline.bucket_lengths(10, 4) == (8, 10)
  assert input_pipeline.bucket_lengths(512, 1) == (512,)
  with pytest.raises(UserError, match="--length_buckets must be at least 1"):
    input_pipeline.bucket_lengths(512, 0)


def test_bucketed_batches_are_the_padded_batches_cut_to_the_fitting_bucket():
  arrays = varied_arrays(200)
  buckets = input_pipeline.LengthBuckets.evenly_spaced(64, 16, 4)
  layout = {"seed": 5, "epoch": 0, "per_device_batch_size": 1, "num_devices": 4}
  padded = list(input_pipeline.train_batches(arrays, **layout))
  bucketed = list(input_pipeline.train_batches(arrays, buckets=buckets, **layout))
  widths = set()
  for full, cut in zip(padded, bucketed, strict=True):
    source_width, target_width = cut["input_ids"].shape[-1], cut["labels"].shape[-1]
    widths.add((source_width, target_width))
    longest_source = full["attention_mask"].sum(-1).max()
    longest_target = full["decoder_attention_mask"].sum(-1).max()
    assert source_width == min(b for b in buckets.source if b >= longest_source)
    assert target_width == min(b for b in buckets.target if b >= longest_target)
    for key, value in full.items():
      if value.ndim == 3:
        width = source_width if key in ("input_ids", "attention_mask") else target_width
        np.testing.assert_array_equal(cut[key], value[..., :width])
        assert not value[..., width:].any()  # Only padding was cut.
      else:
        np.testing.assert_array_equal(cut[key], value)
  assert len(widths) > 2  # Several buckets occur in this data.


def test_bucket_widths_follow_the_global_batch_on_every_process():
  arrays = varied_arrays(64)
  buckets = input_pipeline.LengthBuckets.evenly_spaced(64, 16, 8)
  layout = {"seed": 0, "epoch": 0, "per_device_batch_size": 2, "buckets": buckets}
  single = list(input_pipeline.train_batches(arrays, num_devices=4, **layout))
  parts = [list(input_pipeline.train_batches(arrays, num_devices=2, process_index=p,
                                             process_count=2, **layout)) for p in range(2)]
  for whole, part0, part1 in zip(single, *parts, strict=True):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part0[key], part1[key]]), whole[key])
  eval_parts = [list(input_pipeline.eval_batches(arrays, per_device_batch_size=3, num_devices=2,
                                                 process_index=p, process_count=2,
                                                 buckets=buckets)) for p in range(2)]
  eval_single = list(input_pipeline.eval_batches(arrays, per_device_batch_size=3, num_devices=4,
                                                 buckets=buckets))
  seen = []
  for whole, part0, part1 in zip(eval_single, *eval_parts, strict=True):
    np.testing.assert_array_equal(np.concatenate([part0["input_ids"], part1["input_ids"]]),
                                  whole["input_ids"])
    seen += [i for i in whole["example_index"].ravel() if i >= 0]
  assert sorted(seen) == list(range(64))


def test_group_by_length_sorts_within_megabatches_and_keeps_every_row():
  arrays = varied_arrays(1000)
  layout = {"seed": 2, "epoch": 1, "per_device_batch_size": 2, "num_devices": 2}
  shuffled = np.concatenate(_train_order(arrays, **layout), axis=None)
  grouped = np.concatenate(_train_order(arrays, grouped_by_length=True, **layout), axis=None)
  np.testing.assert_array_equal(np.sort(grouped), np.sort(shuffled))
  lengths = arrays.source_lengths[grouped]
  megabatch = 50 * 4
  for start in range(0, len(grouped), megabatch):
    chunk = lengths[start:start + megabatch]
    assert (np.diff(chunk) <= 0).all()  # Longest first.
    np.testing.assert_array_equal(np.sort(grouped[start:start + megabatch]),
                                  np.sort(shuffled[start:start + megabatch]))
  resumed = np.concatenate(_train_order(arrays, grouped_by_length=True, start_batch=70,
                                        **layout), axis=None)
  np.testing.assert_array_equal(resumed, grouped[70 * 4:])


def test_length_buckets_follow_the_config(tmp_path):
  config = make_config(tmp_path, max_source_length=256, max_target_length=64,
                       val_max_target_length=48)
  assert input_pipeline.length_buckets(config, "train") == input_pipeline.LengthBuckets(
      (64, 128, 192, 256), (16, 32, 48, 64))
  assert input_pipeline.length_buckets(config, "test").target == (16, 24, 40, 48)
  config.pad_to_max_length = True
  assert input_pipeline.length_buckets(config, "train") is None


def test_in_background_yields_every_item_in_order_and_reraises_errors():
  assert list(input_pipeline.in_background(iter(range(50)), size=3)) == list(range(50))

  def failing():
    yield 1
    raise ValueError("bad row 2")

  items = input_pipeline.in_background(failing())
  assert next(items) == 1
  with pytest.raises(ValueError, match="bad row 2"):
    next(items)


def test_closing_in_background_stops_its_thread():
  import time
  produced = []

  def endless():
    while True:
      produced.append(len(produced))
      yield produced[-1]

  items = input_pipeline.in_background(endless(), size=2)
  assert [next(items) for _ in range(3)] == [0, 1, 2]
  items.close()
  time.sleep(0.5)
  count = len(produced)
  time.sleep(0.3)
  assert len(produced) == count <= 3 + 2 + 1  # Stopped: at most the buffer filled after us.
