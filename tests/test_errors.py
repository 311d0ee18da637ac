"""The catalogue of user mistakes, end to end through the real command line.

Each mistake is one line on stderr (`error: <problem>: <fix>`), exit code 2, no traceback, and
nothing in output_dir destroyed. Almost every error fires before a model is built; the one
training run here checks what is clamped rather than refused.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import transformers

import helpers
from flax_sum import config as config_lib
from flax_sum import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY_T5 = {**helpers.TINY_T5_CONFIG, "dropout_rate": 0.0}
# config.json values of the wrong type or range: {file name: (key, value)}.
BAD_CONFIG_VALUES = {
    "big_d_model.json": ("d_model", "big"), "no_layers.json": ("num_layers", 0),
    "negative_vocab.json": ("vocab_size", -3), "boolean_heads.json": ("num_heads", True),
    "text_dropout.json": ("dropout_rate", "x"), "zero_epsilon.json": ("layer_norm_epsilon", 0),
}


def rows(count, start=0):
  return [{"text": f"Document {i} is about the topic number {i}.", "summary": f"Topic {i}."}
          for i in range(start, start + count)]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(record) + "\n" for record in records))
  return str(path)


@pytest.fixture
def files(tmp_path):
  """Good and bad inputs, a tiny T5 config and the flags every case starts from."""
  (tmp_path / "tiny.json").write_text(json.dumps(TINY_T5))
  (tmp_path / "weights_missing").mkdir()
  (tmp_path / "weights_missing" / "config.json").write_text(json.dumps(TINY_T5))
  (tmp_path / "bart").mkdir()
  (tmp_path / "bart" / "config.json").write_text(
      json.dumps({"model_type": "bart", "vocab_size": 50265, "d_model": 16}))
  (tmp_path / "small_vocab.json").write_text(json.dumps({**TINY_T5, "vocab_size": 100}))
  for name, (key, value) in BAD_CONFIG_VALUES.items():
    (tmp_path / name).write_text(json.dumps({**TINY_T5, key: value}))
  (tmp_path / "no_tokenizer").mkdir()
  (tmp_path / "a_directory.jsonl").mkdir()
  (tmp_path / "notes.txt").write_text("text,summary\na,b\n")
  (tmp_path / "empty.csv").write_text("")
  (tmp_path / "blank.jsonl").write_text("\n  \n")
  (tmp_path / "bad.jsonl").write_text('{"text": "a", "summary": "b"}\n'
                                      '{"text": "a", summary: "b"}\n')
  (tmp_path / "fields.csv").write_text("text,summary\na,b\nc,d,e,f\n")
  (tmp_path / "quote.csv").write_text('text,summary\na,b\n"c,d\n')
  (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "summary": "b"}\n'.encode("latin-1"))
  (tmp_path / "one_column.csv").write_text("text\na\nb\n")
  write_jsonl(tmp_path / "nulls.jsonl", [{"text": "a", "summary": None},
                                         {"text": None, "summary": "b"}])
  good = write_jsonl(tmp_path / "good.jsonl", rows(8))
  (tmp_path / "a_file").write_text("not a directory")
  return types.SimpleNamespace(
      dir=tmp_path, good=good,
      base=["--config_name", str(tmp_path / "tiny.json"), "--text_column", "text",
            "--summary_column", "summary", "--max_source_length", "32",
            "--max_target_length", "8", "--per_device_train_batch_size", "1"])


def train_on(files, name):
  return [*files.base, "--do_train", "--train_file", str(files.dir / name)]


def config_case(name, expected):
  """A case training from scratch on the bad config.json `name`."""
  key, value = BAD_CONFIG_VALUES[name]
  return (f"config.json {key} {value!r}", lambda f: (
      ["--config_name", str(f.dir / name), *f.base[2:], "--do_train", "--train_file", f.good],
      f"error: config.json: {key} must be {expected}, got {value!r}: fix the model's "
      "config.json"))


# (id, files -> (argv, the message fragment)); argv gets --output_dir DIR/out unless it has one.
CASES = [
    ("missing train file", lambda f: (
        train_on(f, "nope.jsonl"), f"--train_file {f.dir / 'nope.jsonl'}: no such file")),
    ("missing validation file", lambda f: (
        [*f.base, "--do_eval", "--validation_file", str(f.dir / "nope.csv")],
        f"--validation_file {f.dir / 'nope.csv'}: no such file")),
    ("missing test file", lambda f: (
        [*f.base, "--do_predict", "--test_file", str(f.dir / "nope.json")],
        f"--test_file {f.dir / 'nope.json'}: no such file")),
    ("a directory in place of a file", lambda f: (
        train_on(f, "a_directory.jsonl"),
        f"--train_file {f.dir / 'a_directory.jsonl'} is a directory: pass a .csv, .json, .jsonl "
        "file")),
    ("unsupported extension", lambda f: (
        train_on(f, "notes.txt"),
        "notes.txt: unsupported extension '.txt'; use one of .csv, .json, .jsonl")),
    ("empty file", lambda f: (train_on(f, "empty.csv"), "empty.csv: the file is empty")),
    ("blank file", lambda f: (train_on(f, "blank.jsonl"), "blank.jsonl: the file is empty")),
    ("invalid JSON", lambda f: (
        train_on(f, "bad.jsonl"),
        "bad.jsonl: cannot parse it: line 2: Expecting property name enclosed in double quotes")),
    ("CSV row with too many fields", lambda f: (
        train_on(f, "fields.csv"),
        "fields.csv: cannot parse it: Error tokenizing data. C error: Expected 2 fields in line 3, "
        "saw 4")),
    ("CSV quote never closed", lambda f: (
        train_on(f, "quote.csv"), "quote.csv: cannot parse it: Error tokenizing data. C error: "
        "EOF inside string starting at row 2")),
    ("not UTF-8", lambda f: (
        train_on(f, "latin1.jsonl"), "latin1.jsonl: line 1 is not UTF-8 (byte 0xe9 at byte 14 of "
        "the line); save the file as UTF-8 text")),
    ("text column missing", lambda f: (
        [*train_on(f, "good.jsonl"), "--text_column", "body"],
        "--text_column 'body' is not a column of the train data; available: text, summary")),
    ("summary column missing", lambda f: (
        ["--config_name", str(f.dir / "tiny.json"), "--do_train", "--train_file",
         str(f.dir / "one_column.csv")],
        "the train data has only the columns text; it needs a text and a summary column")),
    ("every row null", lambda f: (
        train_on(f, "nulls.jsonl"), "the train data has no row with a non-empty text in both "
        "'text' and 'summary' (2 rows read)")),
    ("--do_eval without validation data", lambda f: (
        [*train_on(f, "good.jsonl"), "--do_eval"],
        "--do_eval needs validation data: pass --validation_file or --dataset_name")),
    ("--do_predict without test data", lambda f: (
        [*f.base, "--do_predict", "--validation_file", f.good],
        "--do_predict needs test data: pass --test_file or --dataset_name")),
    ("--do_train without train data", lambda f: (
        [*f.base, "--do_train", "--validation_file", f.good],
        "--do_train needs train data: pass --train_file or --dataset_name")),
    ("--max_train_samples 0", lambda f: (
        [*train_on(f, "good.jsonl"), "--max_train_samples", "0"],
        "--max_train_samples must be positive, got 0")),
    ("--max_eval_samples -1", lambda f: (
        [*f.base, "--do_eval", "--validation_file", f.good, "--max_eval_samples", "-1"],
        "--max_eval_samples must be positive, got -1")),
    ("--max_predict_samples 0", lambda f: (
        [*f.base, "--do_predict", "--test_file", f.good, "--max_predict_samples", "0"],
        "--max_predict_samples must be positive, got 0")),
    ("unknown flag", lambda f: (
        [*train_on(f, "good.jsonl"), "--num_train_epoch", "2"],
        "unknown flag --num_train_epoch: did you mean --num_train_epochs?")),
    ("wrong type", lambda f: (
        [*train_on(f, "good.jsonl"), "--learning_rate", "fast"],
        "--learning_rate expects a number, got 'fast'")),
    ("--fp16 with --bf16", lambda f: (
        [*train_on(f, "good.jsonl"), "--fp16", "--bf16"],
        "conflicting flags --fp16 and --bf16: pass only one")),
    ("nothing to do", lambda f: (
        [*f.base, "--do_train=false", "--do_eval=false", "--do_predict=false"],
        "nothing to do: pass --do_train, --do_eval and/or --do_predict")),
    ("model directory without weights", lambda f: (
        ["--model_name_or_path", str(f.dir / "weights_missing"), "--tokenizer_name",
         str(config_lib.BUNDLED_TOKENIZER_DIR), *f.base[2:], "--do_train", "--train_file", f.good],
        f"no weights in {f.dir / 'weights_missing'}: expected config.json with model.safetensors")),
    ("model directory that does not exist", lambda f: (
        ["--model_name_or_path", str(f.dir / "nowhere"), "--tokenizer_name",
         str(config_lib.BUNDLED_TOKENIZER_DIR), "--per_device_train_batch_size", "1",
         "--do_train", "--train_file", f.good],
        f"model directory {f.dir / 'nowhere'} does not exist")),
    ("config that is not T5", lambda f: (
        ["--config_name", str(f.dir / "bart"), *f.base[2:], "--do_train", "--train_file", f.good],
        "model_type 'bart' is not supported: only T5 models (model_type 't5') can be trained")),
    ("vocabulary smaller than the tokenizer's", lambda f: (
        ["--config_name", str(f.dir / "small_vocab.json"), *f.base[2:], "--do_train",
         "--train_file", f.good],
        "the tokenizer has 32100 tokens but the model only 100: pass a matching --tokenizer_name")),
    config_case("big_d_model.json", "a positive integer"),
    config_case("no_layers.json", "a positive integer"),
    config_case("negative_vocab.json", "a positive integer"),
    config_case("boolean_heads.json", "a positive integer"),
    config_case("text_dropout.json", "a number in [0, 1)"),
    config_case("zero_epsilon.json", "a positive number"),
    ("config file missing", lambda f: (
        ["--config_name", str(f.dir / "nope.json"), *f.base[2:], "--do_train", "--train_file",
         f.good], f"no T5 config at {f.dir / 'nope.json'}")),
    ("tokenizer missing", lambda f: (
        [*train_on(f, "good.jsonl"), "--tokenizer_name", str(f.dir / "nowhere")],
        f"--tokenizer_name {f.dir / 'nowhere'}: not a directory")),
    ("tokenizer directory without a tokenizer", lambda f: (
        [*train_on(f, "good.jsonl"), "--tokenizer_name", str(f.dir / "no_tokenizer")],
        f"--tokenizer_name {f.dir / 'no_tokenizer'}: no tokenizer found")),
    ("batch larger than the training set", lambda f: (
        [*train_on(f, "good.jsonl"), "--per_device_train_batch_size", "2"],
        "the training data has 8 examples, fewer than one global batch of 16 "
        "(--per_device_train_batch_size 2 x 8 devices x --gradient_accumulation_steps 1): lower "
        "--per_device_train_batch_size or --gradient_accumulation_steps, or add training data")),
    ("accumulation past the training set", lambda f: (
        [*train_on(f, "good.jsonl"), "--per_device_train_batch_size", "1",
         "--gradient_accumulation_steps", "2"],
        "fewer than one global batch of 16 (--per_device_train_batch_size 1 x 8 devices x "
        "--gradient_accumulation_steps 2)")),
    ("output_dir that is a file", lambda f: (
        [*train_on(f, "good.jsonl"), "--output_dir", str(f.dir / "a_file")],
        f"--output_dir {f.dir / 'a_file'} is a file: choose a directory")),
]


def snapshot(directory):
  """{relative path: bytes} of every file under `directory` (empty if it does not exist)."""
  directory = pathlib.Path(directory)
  if not directory.exists():
    return {}
  if directory.is_file():
    return {".": directory.read_bytes()}
  return {str(path.relative_to(directory)): path.read_bytes()
          for path in directory.rglob("*") if path.is_file()}


def assert_one_error_line(err, fragment):
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("error: "), err
  assert fragment in lines[0]
  assert "Traceback" not in err


@pytest.mark.parametrize("case", [make for _, make in CASES], ids=[name for name, _ in CASES])
def test_each_mistake_is_one_line_with_exit_code_2_and_nothing_destroyed(files, case, capsys):
  argv, fragment = case(files)
  if "--output_dir" not in argv:
    argv = [*argv, "--output_dir", str(files.dir / "out")]
  output_dir = argv[argv.index("--output_dir") + 1]
  before = snapshot(output_dir)
  assert train.main(argv) == 2
  captured = capsys.readouterr()
  assert_one_error_line(captured.err, fragment)
  assert "Traceback" not in captured.out
  assert snapshot(output_dir) == before


def test_a_non_empty_output_dir_is_kept(files, capsys):
  output_dir = files.dir / "out"
  output_dir.mkdir()
  (output_dir / "model.safetensors").write_bytes(b"an earlier model")
  assert train.main([*train_on(files, "good.jsonl"), "--output_dir", str(output_dir)]) == 2
  assert_one_error_line(capsys.readouterr().err,
                        f"--output_dir {output_dir} is not empty and holds no checkpoint to "
                        "resume: pass --overwrite_output_dir")
  assert snapshot(output_dir) == {"model.safetensors": b"an earlier model"}


def test_an_unreadable_file_is_one_line(files, capsys, monkeypatch):
  path = files.dir / "locked.jsonl"
  write_jsonl(path, rows(3))
  path.chmod(0)
  if os.geteuid() == 0:  # Root reads a file whatever its permissions: refuse it here instead.
    read_bytes = pathlib.Path.read_bytes

    def refuse_locked(self):
      if self == path:
        raise PermissionError(13, "Permission denied", str(self))
      return read_bytes(self)
    monkeypatch.setattr(pathlib.Path, "read_bytes", refuse_locked)
  assert train.main([*train_on(files, "locked.jsonl"), "--output_dir",
                     str(files.dir / "out")]) == 2
  assert_one_error_line(capsys.readouterr().err,
                        f"--train_file {path}: cannot read it (Permission denied): fix its "
                        "permissions or pass another file")


@pytest.mark.parametrize("name, fragment", [
    ("bad.jsonl", "bad.jsonl: cannot parse it: line 2:"),
    ("fields.csv", "fields.csv: cannot parse it: Error tokenizing data."),
])
def test_no_traceback_or_library_message_reaches_the_terminal(files, name, fragment):
  """A process of its own: what the libraries print on their own handlers is seen too."""
  result = subprocess.run(
      [sys.executable, "-m", "flax_sum.train", *train_on(files, name), "--output_dir",
       str(files.dir / "out")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert_one_error_line(result.stderr, fragment)
  assert "Traceback" not in result.stdout


def test_sample_counts_and_eval_batches_beyond_the_data_are_clamped_with_notes(files, capsys):
  tokenizer_dir = files.dir / "tokenizer_512"
  transformers.T5Tokenizer.from_pretrained(str(config_lib.BUNDLED_TOKENIZER_DIR),
                                           model_max_length=512).save_pretrained(tokenizer_dir)
  output_dir = files.dir / "out"
  status = train.main([
      *files.base, "--tokenizer_name", str(tokenizer_dir), "--max_source_length", "600",
      "--do_train", "--do_eval", "--do_predict",
      "--train_file", write_jsonl(files.dir / "train.jsonl", rows(8)),
      "--validation_file", write_jsonl(files.dir / "validation.jsonl", rows(3, start=8)),
      "--test_file", write_jsonl(files.dir / "test.jsonl", rows(2, start=11)),
      "--max_train_samples", "1000", "--max_eval_samples", "500", "--max_predict_samples", "9",
      "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "16",
      "--max_steps", "1", "--output_dir", str(output_dir)])
  captured = capsys.readouterr()
  assert status == 0, captured.err
  assert captured.err == ""
  for split, flag, count in (("train", "max_train_samples 1000", 8),
                             ("validation", "max_eval_samples 500", 3),
                             ("test", "max_predict_samples 9", 2)):
    assert f"{split}: --{flag} is more than the {count} examples; using all of them" in captured.out
  notes = [line for line in captured.out.splitlines() if "Note: " in line]
  assert len(notes) == 1
  assert notes[0].endswith(
      "Note: --max_source_length 600 is more than the 512 tokens the model was pretrained on; "
      "T5's relative positions accept any length, but attention memory grows with the square of "
      "the length")
  results = json.loads((output_dir / "all_results.json").read_text())
  # Every example once, though 3 and 2 rows fill little of a batch of 16 x 8 devices.
  assert (results["train_samples"], results["eval_samples"], results["predict_samples"]) == (
      8, 3, 2)
