"""The command line: both syntaxes, base selection, the mode rule, errors and help."""

import json
import pathlib

import pytest

from flax_sum import cli
from flax_sum import config as config_lib
from flax_sum.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED_COMMAND = [
    "--model_name_or_path", "google-t5/t5-small", "--do_train", "--do_eval",
    "--dataset_name", "cnn_dailymail", "--dataset_config", "3.0.0",
    "--source_prefix", "summarize: ", "--output_dir", "/tmp/tst-summarization",
    "--per_device_train_batch_size=4", "--per_device_eval_batch_size=4",
    "--overwrite_output_dir", "--predict_with_generate",
]


def parse(*argv: str) -> dict:
  return cli.config_to_dict(cli.parse_args(list(argv)))


def error_of(*argv: str) -> str:
  with pytest.raises(UserError) as info:
    cli.parse_args(list(argv))
  message = str(info.value)
  assert "\n" not in message
  return message


# ------------------------------------------------------------------- the two syntaxes


@pytest.mark.parametrize("hf_args, config_args", [
    (["--learning_rate", "1e-4", "--do_train"],
     ["--config.learning_rate=1e-4", "--config.do_train=true"]),
    (["--learning_rate=3e-4", "--max_steps", "-1", "--seed=7"],
     ["--config.learning_rate", "3e-4", "--config.max_steps=-1", "--config.seed", "7"]),
    (["--max_train_samples", "100", "--output_dir=/tmp/x", "--source_prefix", "summarize: "],
     ["--config.max_train_samples=100", "--config.output_dir", "/tmp/x",
      "--config.source_prefix=summarize: "]),
    (["--do_eval", "--do_train=false", "--predict_with_generate", "False"],
     ["--config.do_eval", "true", "--config.do_train", "false",
      "--config.predict_with_generate=0"]),
    (["--overwrite_output_dir", "yes", "--weight_decay", "0.1", "--optim=adafactor"],
     ["--config.overwrite_output_dir=YES", "--config.weight_decay=0.1",
      "--config.optim", "adafactor"]),
])
def test_both_syntaxes_give_the_same_config(hf_args, config_args):
  assert parse(*hf_args) == parse(*config_args)


def test_values_are_parsed_with_the_key_type():
  config = cli.parse_args(["--learning_rate", "3e-4", "--max_train_samples=100",
                           "--do_predict", "--seed", "3", "--num_train_epochs", "2",
                           "--dataset_name", "xsum"])
  assert config.learning_rate == pytest.approx(3e-4) and type(config.learning_rate) is float
  assert config.max_train_samples == 100 and type(config.max_train_samples) is int
  assert config.seed == 3 and type(config.seed) is int
  assert config.num_train_epochs == 2.0 and type(config.num_train_epochs) is float
  assert config.do_predict is True
  assert config.dataset_name == "xsum"


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False),
])
def test_boolean_spellings(text, expected):
  assert cli.parse_args([f"--overwrite_cache={text}"]).overwrite_cache is expected
  assert cli.parse_args(["--overwrite_cache", text]).overwrite_cache is expected
  assert cli.parse_args([f"--config.overwrite_cache={text}"]).overwrite_cache is expected


def test_bare_boolean_flags_are_true_in_both_syntaxes():
  assert cli.parse_args(["--overwrite_cache"]).overwrite_cache is True
  assert cli.parse_args(["--config.overwrite_cache"]).overwrite_cache is True
  assert cli.parse_args(["--overwrite_cache", "--seed", "1"]).seed == 1


def test_none_resets_a_key_whose_default_is_none():
  assert cli.parse_args(["--eval_steps", "None"]).eval_steps is None
  assert cli.parse_args(["--config.max_eval_samples=None"]).max_eval_samples is None


def test_aliases_map_onto_their_key():
  by_alias = parse("--dataset_config_name", "3.0.0", "--push_to_hub_model_id=me/model")
  by_key = parse("--dataset_config", "3.0.0", "--hub_model_id=me/model")
  assert by_alias == by_key
  assert by_alias["dataset_config"] == "3.0.0"
  assert by_alias["hub_model_id"] == "me/model"


def test_dashed_spelling_of_a_flag_is_accepted():
  assert cli.parse_args(["--learning-rate", "2e-4"]).learning_rate == pytest.approx(2e-4)


def test_last_value_wins():
  assert cli.parse_args(["--seed", "1", "--config.seed=2"]).seed == 2


# ---------------------------------------------------------------------- base selection


def test_no_source_flag_tweaks_the_embedded_default():
  config = cli.parse_args(["--max_steps", "20", "--output_dir", "/tmp/x"])
  expected = cli.config_to_dict(cli.default_config())
  expected.update(max_steps=20, output_dir="/tmp/x")
  assert cli.config_to_dict(config) == expected
  assert config.train_file.endswith("dialogsum/train.jsonl")


def test_empty_command_line_is_the_embedded_default():
  assert parse() == cli.config_to_dict(cli.default_config())


def test_seed_command_starts_from_hugging_face_defaults():
  config = parse(*SEED_COMMAND)
  expected = cli.config_to_dict(config_lib.base_config())
  expected.update(
      model_name_or_path="google-t5/t5-small", do_train=True, do_eval=True,
      dataset_name="cnn_dailymail", dataset_config="3.0.0", source_prefix="summarize: ",
      output_dir="/tmp/tst-summarization", per_device_train_batch_size=4,
      per_device_eval_batch_size=4, overwrite_output_dir=True, predict_with_generate=True)
  assert config == expected
  # Nothing of the embedded default leaks in.
  assert config["train_file"] is None and config["max_steps"] == -1


@pytest.mark.parametrize("source_key", config_lib.SOURCE_KEYS)
def test_every_source_key_selects_hugging_face_defaults(source_key):
  for argv in ([f"--{source_key}", "x"], [f"--config.{source_key}=x"]):
    config = parse(*argv)
    assert config[source_key] == "x"
    assert config["learning_rate"] == 5e-5 and config["max_steps"] == -1


def test_config_file_is_the_base_and_overrides_apply():
  config = parse("--config", "configs/t5_small_cnn_dailymail.py", "--config.max_train_samples=1000",
                 "--learning_rate", "1e-4")
  assert config["model_name_or_path"] == "google-t5/t5-small"
  assert config["dataset_name"] == "cnn_dailymail"
  assert config["per_device_train_batch_size"] == 4
  assert config["max_train_samples"] == 1000
  assert config["learning_rate"] == 1e-4
  assert config["do_train"] and config["do_eval"] and not config["do_predict"]


def test_config_file_resolves_against_the_repository_root(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = parse("--config=configs/default.py", "--train_file", "mine.jsonl")
  # A source key does not replace an explicit --config base.
  assert config["train_file"] == "mine.jsonl"
  assert config["learning_rate"] == cli.default_config().learning_rate != 5e-5
  assert config["text_column"] == "dialogue"


def test_config_file_relative_to_the_current_directory_and_missing_keys(tmp_path, monkeypatch):
  (tmp_path / "mine.py").write_text(
      "import ml_collections\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict({'learning_rate': 0.5, 'extra_steps': 3})\n")
  monkeypatch.chdir(tmp_path)
  config = cli.parse_args(["--config", "mine.py", "--config.extra_steps=4", "--seed", "9"])
  assert config.learning_rate == 0.5
  assert config.extra_steps == 4
  assert config.seed == 9
  # Schema keys the file leaves out get Hugging Face's defaults.
  assert config.max_steps == -1 and config.model_name_or_path is None
  assert error_of("--config", "mine.py", "--config.extra_steps=x") == (
      "--config.extra_steps expects an integer, got 'x'")


# ------------------------------------------------------------------------ the mode rule


def test_turning_on_a_mode_turns_off_the_unmentioned_ones():
  config = parse("--do_eval", "--output_dir", "trained/")
  assert (config["do_train"], config["do_eval"], config["do_predict"]) == (False, True, False)
  assert config["train_file"].endswith("train.jsonl")  # Still the embedded default.


def test_mode_rule_is_the_same_in_both_syntaxes():
  assert parse("--do_train", "--do_predict") == parse(
      "--config.do_train=true", "--config.do_predict", "true")
  config = parse("--config.do_predict=1")
  assert (config["do_train"], config["do_eval"], config["do_predict"]) == (False, False, True)


def test_turning_modes_off_keeps_the_others():
  config = parse("--do_predict=false")
  assert (config["do_train"], config["do_eval"], config["do_predict"]) == (True, True, False)


def test_mode_rule_applies_on_a_config_file():
  config = parse("--config", "configs/t5_small_cnn_dailymail.py", "--do_predict")
  assert (config["do_train"], config["do_eval"], config["do_predict"]) == (False, False, True)


# ------------------------------------------------------------------------------ errors


def test_unknown_flag_suggests_the_nearest():
  assert error_of("--learnig_rate", "1e-4") == (
      "unknown flag --learnig_rate: did you mean --learning_rate?")
  assert error_of("--config.learnig_rate=1e-4") == (
      "unknown key --config.learnig_rate: did you mean --config.learning_rate?")
  assert "did you mean --config.seed?" in error_of("--confg.seed=1")
  assert error_of("--zzzzzz") == "unknown flag --zzzzzz: see --help for every key"


def test_wrong_type():
  assert error_of("--per_device_train_batch_size", "abc") == (
      "--per_device_train_batch_size expects an integer, got 'abc'")
  assert error_of("--config.learning_rate=fast") == (
      "--config.learning_rate expects a number, got 'fast'")
  assert error_of("--max_train_samples=1.5") == (
      "--max_train_samples expects an integer, got '1.5'")
  assert error_of("--do_train=maybe") == (
      "--do_train expects a boolean (true/false), got 'maybe'")


def test_missing_value():
  assert error_of("--output_dir") == (
      "--output_dir expects a value (a string), e.g. --output_dir=VALUE")
  message = error_of("--seed", "--do_train")
  assert message.startswith("--seed expects a value (an integer)")
  assert "--config expects a file" in error_of("--config")


def test_fp16_with_bf16_conflicts():
  assert "conflicting flags --fp16 and --bf16" in error_of("--fp16", "--bf16")
  assert "conflicting" in error_of("--config.fp16=true", "--bf16=1")
  assert cli.parse_args(["--fp16"]).fp16 is True  # Left as given.


def test_positional_arguments_are_refused():
  assert "unexpected argument 'cnn_dailymail'" in error_of("--dataset_name", "x", "cnn_dailymail")
  assert "unexpected argument 'foo'" in error_of("--do_train", "foo")
  assert "--config configs/x.py" in error_of("configs/x.py")
  assert "unknown flag -x" in error_of("-x")


def test_missing_config_file():
  message = error_of("--config", "configs/nope.py")
  assert message.startswith("--config configs/nope.py: no such file")
  assert "configs/t5_small_cnn_dailymail.py" in message


def test_config_file_without_get_config(tmp_path):
  path = tmp_path / "empty.py"
  path.write_text("x = 1\n")
  assert "has no get_config()" in error_of("--config", str(path))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  assert "SyntaxError" in error_of("--config", str(broken))


def test_config_given_twice():
  assert "--config given twice" in error_of("--config", "configs/default.py",
                                            "--config=configs/default.py")


# -------------------------------------------------------------------------------- help


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_key_with_its_default(flag, capsys):
  with pytest.raises(SystemExit) as info:
    cli.parse_args(["--seed", "1", flag])
  assert info.value.code == 0
  text = capsys.readouterr().out
  for field in config_lib.FIELDS:
    assert f"--{field.key} " in text
    for alias in field.aliases:
      assert f"--{alias} " in text
  flat = " ".join(text.split())  # argparse wraps to the terminal width.
  # Embedded defaults, and Hugging Face's where they differ.
  default = cli.default_config()
  assert f"Peak learning rate. (default: {default.learning_rate:g}; Hugging Face: 5e-05)" in flat
  assert f"(default: {default.max_steps}; Hugging Face: -1)" in flat
  assert "(default: 42)" in flat
  assert "(default: flax_sum/assets/dialogsum/train.jsonl; Hugging Face: None)" in flat
  assert str(REPO_ROOT) not in text  # Repository paths are shown relative.
  for word in ("--config.KEY", "--config FILE", "configs/default.py", "--do_eval", "INT",
               "FLOAT", "BOOL", "STR", "Hugging Face's run_summarization.py defaults"):
    assert word in flat


# ------------------------------------------------------------------------ config_to_dict


def test_config_to_dict_is_json_serialisable():
  config = cli.parse_args(SEED_COMMAND)
  plain = cli.config_to_dict(config)
  assert json.loads(json.dumps(plain)) == plain
  assert set(plain) == set(config_lib.FIELDS_BY_KEY)
  assert plain["model_name_or_path"] == "google-t5/t5-small"
  assert plain["val_max_target_length"] is None


@pytest.mark.parametrize("debug_flag,shows_traceback", [
    ([], False), (["--debug"], True), (["--debug=false"], False), (["--config.debug=true"], True)])
def test_errors_are_one_line_unless_debug_asks_for_the_traceback(debug_flag, shows_traceback,
                                                                 tmp_path, capsys):
  from flax_sum import train
  output_dir = tmp_path / "out"
  code = train.main(["--do_train", "--learnig_rate", "1e-4", "--output_dir", str(output_dir),
                     *debug_flag])
  err = capsys.readouterr().err
  assert code == 2 and not output_dir.exists()
  assert err.splitlines()[-1] == "error: unknown flag --learnig_rate: did you mean --learning_rate?"
  assert ("Traceback (most recent call last)" in err) is shows_traceback
  assert (len(err.splitlines()) == 1) is not shows_traceback
  assert cli.asks_for_debug(debug_flag) is shows_traceback
