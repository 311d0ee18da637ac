"""The command line: Hugging Face flags and ml_collections `--config` overrides, one config.

Two syntaxes set the same keys of the schema in `flax_sum.config`:

  * Hugging Face `run_summarization.py` flags: `--learning_rate 1e-4`, `--do_train`,
    `--do_train=false`, plus the aliases in `Field.aliases`.
  * ml_collections: `--config configs/<name>.py` picks the base, `--config.key=value` overrides.

`parse_args` chooses the base config (a `--config` file, Hugging Face's defaults when the command
line names a model or data source, else the embedded `configs/default.py`), applies every
override with the key's type, applies the mode rule and raises `UserError` for every mistake.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import pathlib
import sys
import textwrap
import traceback
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from flax_sum import config as config_lib
from flax_sum.errors import UserError

PROG = "python -m flax_sum.train"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "configs" / "default.py"
CONFIG_FLAG = "--config"
CONFIG_PREFIX = "--config."
HELP_FLAGS = ("-h", "--help")

_TRUE_WORDS = ("true", "t", "yes", "y", "1")
_FALSE_WORDS = ("false", "f", "no", "n", "0")
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean (true/false)",
               str: "a string"}
_METAVARS = {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}
_GROUP_TITLES = {
    "model": "model",
    "data": "data",
    "run": "what to run and where",
    "train": "optimisation",
    "generate": "generation",
    "log": "logging, evaluation and saving",
    "later": "precision and the Hub",
    "distributed": "multi-host",
}

# Every Hugging Face flag name (without `--`) -> its config key.
FLAG_TO_KEY: dict[str, str] = {}
for _field in config_lib.FIELDS:
  for _name in (_field.key, *_field.aliases):
    FLAG_TO_KEY[_name] = _field.key


@dataclasses.dataclass(frozen=True)
class _Override:
  """One key set on the command line: `value` is the raw text, None for a bare flag."""
  key: str
  value: str | None
  flag: str  # As the user spelled it, for error messages (e.g. `--config.seed`).


# ----------------------------------------------------------------------------- public API


def parse_args(argv: list[str] | None = None) -> ml_collections.ConfigDict:
  """Turns a command line (without the program name; default `sys.argv[1:]`) into the run's
  config.

  Raises `UserError` (one line) for every mistake; prints the help and raises `SystemExit(0)`
  for `-h`/`--help`. The result is unlocked, for the caller's post-parse normalisation.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(arg in HELP_FLAGS for arg in argv):
    print(format_help())
    raise SystemExit(0)

  config_file, overrides = _tokenize(argv)
  config = _select_base(config_file, overrides)
  for override in overrides:
    _apply(config, override)
  _apply_mode_rule(config, overrides)
  _check_conflicts(config)
  return config


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A plain, JSON-serialisable dict of `config` (for logging and saving)."""
  return _to_plain(config.to_dict())


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Calls `get_config()` of a Python config file; a relative path is looked up in the current
  directory, then in the repository root. Keys of the schema the file lacks get their Hugging
  Face default."""
  resolved = _resolve_config_path(str(path))
  module_name = f"_flax_sum_config_{abs(hash(str(resolved)))}"
  spec = importlib.util.spec_from_file_location(module_name, resolved)
  if spec is None or spec.loader is None:
    raise UserError(f"--config {path}: cannot load it as a Python file; pass a .py file with "
                    "get_config()")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as exc:  # The user's file: report it on one line.
    raise UserError(
        f"--config {path}: loading it failed with {_one_line(exc)}; fix the file") from exc
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UserError(f"--config {path} has no get_config(); define get_config() returning an "
                    "ml_collections.ConfigDict")
  try:
    config = get_config()
  except Exception as exc:
    raise UserError(
        f"--config {path}: get_config() failed with {_one_line(exc)}; fix the file") from exc
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"--config {path}: get_config() returned {type(config).__name__}; return "
                    "an ml_collections.ConfigDict")
  _fill_missing_keys(config)
  return config


def default_config() -> ml_collections.ConfigDict:
  """The embedded default, `configs/default.py`."""
  return load_config_file(DEFAULT_CONFIG_FILE)


def format_help() -> str:
  """The `-h` text: every key by group, with its flags, type, defaults and help."""
  try:
    defaults = default_config()
  except UserError:
    defaults = config_lib.base_config()
  hf_defaults = config_lib.base_config()

  parser = argparse.ArgumentParser(
      prog=PROG, add_help=False, formatter_class=_HelpFormatter,
      usage=f"{PROG} [-h] [--config FILE] [--KEY VALUE ...] [--config.KEY=VALUE ...]",
      description=_DESCRIPTION, epilog=_EPILOG)
  options = parser.add_argument_group("options")
  options.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
  options.add_argument(CONFIG_FLAG, metavar="FILE", help=_escape(
      "A Python file whose get_config() is the base config, e.g. "
      "configs/t5_small_cnn_dailymail.py (see below)."))

  groups: dict[str, argparse._ArgumentGroup] = {}
  for field in config_lib.FIELDS:
    if field.group not in groups:
      groups[field.group] = parser.add_argument_group(
          _GROUP_TITLES.get(field.group, field.group))
    default = _format_value(defaults.get(field.key))
    hf_default = _format_value(hf_defaults.get(field.key))
    default_text = f"default: {default}"
    if hf_default != default:
      default_text += f"; Hugging Face: {hf_default}"
    flags = [f"--{name}" for name in (field.key, *field.aliases)]
    extra = {"nargs": "?"} if field.type is bool else {}
    groups[field.group].add_argument(
        *flags, metavar=_METAVARS.get(field.type, "VALUE"),
        help=_escape(f"{field.help} ({default_text})"), **extra)
  return parser.format_help().rstrip("\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the description and epilog as written; never splits a path or a flag in two."""

  def __init__(self, prog: str) -> None:
    super().__init__(prog, max_help_position=32)

  def _split_lines(self, text: str, width: int) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width, break_long_words=False,
                         break_on_hyphens=False)


# ------------------------------------------------------------------------------- parsing


def _tokenize(argv: list[str]) -> tuple[str | None, list[_Override]]:
  """Splits argv into the `--config` file and the key overrides, in order."""
  config_file: str | None = None
  overrides: list[_Override] = []
  index = 0
  while index < len(argv):
    arg = argv[index]
    index += 1
    if not arg.startswith("--") or arg == "--":
      raise UserError(_positional_message(arg))
    name, has_value, value = arg[2:].partition("=")
    value_or_none: str | None = value if has_value else None

    if name == "config":
      if value_or_none is None:
        if index >= len(argv) or _looks_like_flag(argv[index]):
          raise UserError("--config expects a file, e.g. "
                          "--config configs/t5_small_cnn_dailymail.py")
        value_or_none = argv[index]
        index += 1
      if config_file is not None:
        raise UserError(f"--config given twice ({config_file} and {value_or_none}); pass one "
                        "file")
      config_file = value_or_none
      continue

    flag = f"--{name}"
    if name.startswith("config."):
      key = name[len("config."):]
    else:
      key = FLAG_TO_KEY.get(name) or FLAG_TO_KEY.get(name.replace("-", "_"))
      if key is None:
        raise UserError(_unknown_flag_message(flag))
    field = config_lib.FIELDS_BY_KEY.get(key)

    if value_or_none is None and index < len(argv):
      next_arg = argv[index]
      is_bool = field is not None and field.type is bool
      if is_bool:
        if next_arg.lower() in _TRUE_WORDS + _FALSE_WORDS:
          value_or_none = next_arg
          index += 1
      elif not _looks_like_flag(next_arg):
        value_or_none = next_arg
        index += 1
    overrides.append(_Override(key=key, value=value_or_none, flag=flag))
  return config_file, overrides


def _select_base(config_file: str | None,
                 overrides: list[_Override]) -> ml_collections.ConfigDict:
  """The config the overrides change: the `--config` file, Hugging Face's defaults or the
  embedded default (see the help's epilog)."""
  if config_file is not None:
    return load_config_file(config_file)
  if any(override.key in config_lib.SOURCE_KEYS for override in overrides):
    return config_lib.base_config()
  return default_config()


def _apply(config: ml_collections.ConfigDict, override: _Override) -> None:
  """Sets one key, parsing the raw text with the key's type."""
  if override.key not in config:
    raise UserError(_unknown_flag_message(override.flag, config))
  value_type = _key_type(config, override.key)
  nullable = _is_nullable(config, override.key)
  if override.value is None:
    if value_type is not bool:
      raise UserError(f"{override.flag} expects a value ({_TYPE_NAMES.get(value_type, 'a value')}"
                      f"), e.g. {override.flag}=VALUE")
    value: Any = True
  else:
    value = _parse_value(override.flag, override.value, value_type, nullable)
  try:
    config[override.key] = value
  except (TypeError, ValueError) as exc:
    raise UserError(f"{override.flag}: cannot set {override.value!r}: {_one_line(exc)}") from exc


def asks_for_debug(argv: Sequence[str]) -> bool:
  """Whether a command line turns --debug on (read before, and whatever, parsing fails)."""
  for arg in argv:
    name, _, value = arg.partition("=")
    if name in ("--debug", "--config.debug"):
      try:
        return parse_bool(value) if value else True
      except ValueError:
        return False
  return False


def print_error(label: str, error: BaseException, argv: Sequence[str]) -> None:
  """`label: message` on stderr, after the traceback when the command line asks for --debug."""
  if asks_for_debug(argv):
    traceback.print_exception(error)
  print(f"{label}: {error}", file=sys.stderr)


class WithoutTracebacks(logging.Filter):
  """Keeps the line of a library's error log record but drops its traceback: a run that fails
  ends with one line of its own (--debug keeps them)."""

  def filter(self, record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = record.stack_info = None
    return True


WITHOUT_TRACEBACKS = WithoutTracebacks()


def quiet_library_tracebacks(debug: bool) -> None:
  """Unless --debug: no traceback of a library's log record reaches the terminal."""
  # Orbax logs a failed background save with its traceback, through absl's logger; a filter
  # there also covers the progress bar's handler, which replaces the root's on a terminal.
  absl_logger = logging.getLogger("absl")
  if debug:
    absl_logger.removeFilter(WITHOUT_TRACEBACKS)
    return
  absl_logger.addFilter(WITHOUT_TRACEBACKS)
  for handler in logging.getLogger().handlers:
    handler.addFilter(WITHOUT_TRACEBACKS)


def parse_bool(text: str) -> bool:
  """true/false, t/f, yes/no, y/n or 1/0, in any case; anything else is a ValueError."""
  lowered = text.strip().lower()
  if lowered in _TRUE_WORDS:
    return True
  if lowered in _FALSE_WORDS:
    return False
  raise ValueError(f"expected true or false, got {text!r}")


def _parse_value(flag: str, text: str, value_type: type, nullable: bool) -> Any:
  """Parses `text` as `value_type`; `None` means None for keys whose default is None."""
  if nullable and text == "None":
    return None
  expected = _TYPE_NAMES.get(value_type)
  if expected is None:
    raise UserError(f"{flag} has type {value_type.__name__}, which the command line cannot set; "
                    "set it in a --config file")
  if value_type is bool:
    try:
      return parse_bool(text)
    except ValueError:
      pass
  elif value_type is int:
    try:
      return int(text)
    except ValueError:
      pass
  elif value_type is float:
    try:
      return float(text)
    except ValueError:
      pass
  else:
    return text
  raise UserError(f"{flag} expects {expected}, got {text!r}")


def _apply_mode_rule(config: ml_collections.ConfigDict, overrides: list[_Override]) -> None:
  """If the command line turns on a mode, the modes it does not mention are turned off."""
  mentioned = {override.key for override in overrides if override.key in config_lib.MODE_KEYS}
  if any(config.get(key) for key in mentioned):
    for key in config_lib.MODE_KEYS:
      if key not in mentioned and key in config:
        config[key] = False


def _check_conflicts(config: ml_collections.ConfigDict) -> None:
  if config.get("fp16") and config.get("bf16"):
    raise UserError("conflicting flags --fp16 and --bf16: pass only one (--fp16 runs as "
                    "bfloat16 anyway)")


# ------------------------------------------------------------------------------- helpers


def _looks_like_flag(arg: str) -> bool:
  """`--name` or `-x` (but not a negative number such as -1 or -1e-3)."""
  return arg.startswith("--") or (len(arg) >= 2 and arg[0] == "-" and arg[1].isalpha())


def _positional_message(arg: str) -> str:
  if arg.endswith(".json"):
    return (f"unexpected argument {arg!r}: a JSON arguments file is not supported; pass its "
            "keys as flags, or write a --config .py file")
  if arg.endswith(".py"):
    return f"unexpected argument {arg!r}: pass a config file as --config {arg}"
  if arg.startswith("-") and not arg.startswith("--"):
    return f"unknown flag {arg}: flags start with two dashes, see --help"
  return (f"unexpected argument {arg!r}: every argument is a flag (--key value or "
          "--key=value), see --help")


def _unknown_flag_message(flag: str, config: ml_collections.ConfigDict | None = None) -> str:
  """`unknown flag --x: did you mean --y?` with the nearest valid spelling."""
  if flag.startswith(CONFIG_PREFIX):
    keys = list(config.keys()) if config is not None else list(config_lib.FIELDS_BY_KEY)
    candidates = {key: CONFIG_PREFIX + key for key in keys}
    name = flag[len(CONFIG_PREFIX):]
    kind = "key"
  else:
    candidates = {name: f"--{name}" for name in (*FLAG_TO_KEY, "config", "help")}
    name = flag[2:]
    if "." in name:  # A misspelt `--config.` prefix.
      candidates.update({f"config.{key}": CONFIG_PREFIX + key for key in config_lib.FIELDS_BY_KEY})
    kind = "flag"
  matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.65)
  if matches:
    return f"unknown {kind} {flag}: did you mean {candidates[matches[0]]}?"
  return f"unknown {kind} {flag}: see --help for every key"


def _key_type(config: ml_collections.ConfigDict, key: str) -> type:
  field = config_lib.FIELDS_BY_KEY.get(key)
  if field is not None:
    return field.type
  return config.get_type(key)


def _is_nullable(config: ml_collections.ConfigDict, key: str) -> bool:
  field = config_lib.FIELDS_BY_KEY.get(key)
  if field is not None:
    return field.default is None
  return config.get(key) is None


def _fill_missing_keys(config: ml_collections.ConfigDict) -> None:
  """Adds the schema's keys a config file left out, with Hugging Face's defaults."""
  missing = [field.key for field in config_lib.FIELDS if field.key not in config]
  if not missing:
    return
  with config.unlocked():
    for key in missing:
      field = config_lib.FIELDS_BY_KEY[key]
      config[key] = (config_dict.placeholder(field.type) if field.default is None
                     else field.type(field.default))


def _format_value(value: Any) -> str:
  """A default as the help shows it: paths inside the repository are shown relative to it."""
  if isinstance(value, str):
    repo_prefix = str(REPO_ROOT) + "/"
    if value.startswith(repo_prefix):
      value = value[len(repo_prefix):]
    return repr(value) if value == "" or value != value.strip() else value
  return str(value)


def _escape(text: str) -> str:
  """argparse formats help with %; keep literal percent signs."""
  return text.replace("%", "%%")


def _one_line(exc: BaseException) -> str:
  message = " ".join(str(exc).split())
  return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _resolve_config_path(path: str) -> pathlib.Path:
  candidate = pathlib.Path(path).expanduser()
  options = [candidate] if candidate.is_absolute() else [pathlib.Path.cwd() / candidate,
                                                          REPO_ROOT / candidate]
  for option in options:
    if option.is_file():
      return option.resolve()
  available = sorted(p.relative_to(REPO_ROOT).as_posix()
                     for p in (REPO_ROOT / "configs").glob("*.py"))
  hint = f"; available: {', '.join(available)}" if available else ""
  raise UserError(f"--config {path}: no such file{hint}")


def _to_plain(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(key): _to_plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_plain(item) for item in value]
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else str(value)
  if isinstance(value, pathlib.PurePath):
    return str(value)
  try:
    json.dumps(value)
    return value
  except TypeError:
    return str(value)


_DESCRIPTION = """\
Fine-tune a T5 model for summarization with JAX/Flax, the JAX counterpart of Hugging Face's
run_summarization.py. Every key below is both a Hugging Face flag (--KEY VALUE) and an
ml_collections override (--config.KEY=VALUE). "default" is the embedded default
(configs/default.py); "Hugging Face" is run_summarization.py's default where it differs."""

_SOURCE_RULE = textwrap.fill(
    "2. else, if the command line sets a model or data source ("
    + ", ".join("--" + key for key in config_lib.SOURCE_KEYS)
    + ", in either syntax): Hugging Face's run_summarization.py defaults, so its commands "
    "mean the same here.", width=92, initial_indent="  ", subsequent_indent="     ")

_EPILOG = f"""\
two syntaxes set the same keys (mix them; a key given twice keeps the last value):
  Hugging Face flags  --learning_rate 1e-4  --learning_rate=1e-4  --do_train  --do_train=false
  ml_collections      --config FILE  --config.learning_rate=1e-4  --config.do_train false
  Booleans take true/false, yes/no or 1/0 (any case); a bare boolean flag means true.
  Keys whose Hugging Face default is None also take None.

the base config the flags change:
  1. --config FILE given: FILE's get_config() (a relative FILE is looked up in the current
     directory, then in the repository), e.g. --config configs/t5_small_cnn_dailymail.py.
{_SOURCE_RULE}
  3. else: the embedded default configs/default.py (a small T5 trained from scratch on the
     bundled DialogSum, offline); its values are the defaults listed above.

modes: if the command line turns on any of --do_train/--do_eval/--do_predict, only the modes
  it turns on run and the others become false (e.g. `--do_eval --output_dir DIR` evaluates only).

examples:
  {PROG} --max_steps 20 --output_dir /tmp/x
  {PROG} --config configs/t5_small_cnn_dailymail.py --config.max_train_samples=1000
  {PROG} --model_name_or_path google-t5/t5-small --do_train --do_eval \\
      --dataset_name cnn_dailymail --dataset_config "3.0.0" --source_prefix "summarize: " \\
      --output_dir /tmp/tst-summarization --per_device_train_batch_size=4 \\
      --per_device_eval_batch_size=4 --overwrite_output_dir --predict_with_generate"""
