"""Pushing a trained model to the Hugging Face Hub: access check, model card and upload.

`check_hub_access` runs before training so a missing or invalid login fails in seconds rather
than after hours; `write_model_card` and `push_to_hub` run at the end, on process 0 only. The
token stays in memory: it is never printed, logged or written under output_dir.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from flax_sum.errors import UserError

# Never uploaded: Orbax training state (large, resumable only by flax-sum) and temporary files.
UPLOAD_IGNORE_PATTERNS = ("checkpoints", "checkpoints/**", "*.tmp", "**/*.tmp", "*.lock",
                          "**/.DS_Store", ".DS_Store", "**/__pycache__/**")
DEFAULT_COMMIT_MESSAGE = "Upload summarization model trained with flax-sum"
CARD_TAGS = ("summarization", "t5", "flax-sum")
HYPERPARAMETER_KEYS = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                       "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                       "warmup_steps", "weight_decay", "lr_scheduler_type", "optim",
                       "label_smoothing_factor", "max_source_length", "max_target_length", "seed")
METRIC_NAMES = ("rouge1", "rouge2", "rougeL", "rougeLsum", "loss", "gen_len")
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclasses.dataclass(frozen=True)
class HubTarget:
  """Where to push: the repository and the token, which is kept out of repr and off disk."""
  repo_id: str
  token: str = dataclasses.field(repr=False)


def _network_error_types() -> tuple[type[BaseException], ...]:
  """Errors meaning "the Hub could not be reached", whichever HTTP client huggingface_hub uses."""
  error_types: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
  for module_name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                                 ("requests", "ConnectionError"), ("requests", "Timeout")):
    try:
      error_types.append(getattr(importlib.import_module(module_name), attribute))
    except (ImportError, AttributeError):
      pass
  return tuple(error_types)


def _endpoint() -> str:
  return hub_constants.ENDPOINT


def _unreachable_error(error: BaseException) -> UserError:
  if isinstance(error, OfflineModeIsEnabled) or hub_constants.HF_HUB_OFFLINE:
    return UserError(f"--push_to_hub cannot reach the Hub at {_endpoint()}: offline mode is on "
                     "(HF_HUB_OFFLINE=1); unset it, or drop --push_to_hub")
  return UserError(f"--push_to_hub cannot reach the Hub at {_endpoint()} "
                   f"({type(error).__name__}); check the network (or HF_ENDPOINT), or drop "
                   "--push_to_hub")


def _whoami(token: str) -> dict[str, Any]:
  """The token's account, with reachability and validity failures turned into UserErrors."""
  try:
    return huggingface_hub.HfApi(endpoint=_endpoint()).whoami(token=token)
  except HfHubHTTPError as error:
    status = error.response.status_code if error.response is not None else None
    if status == 401:
      raise UserError("--push_to_hub: the Hugging Face token is not valid (401 from "
                      f"{_endpoint()}); run `hf auth login --force` or set a new "
                      "HF_TOKEN") from None
    raise UserError(f"--push_to_hub: checking the Hugging Face login at {_endpoint()} failed "
                    f"(HTTP {status}); try again later, or drop --push_to_hub") from None
  except _network_error_types() as error:
    raise _unreachable_error(error) from None


def resolve_repo_id(config: Any, token: str, *, user: str | None = None) -> str:
  """`hub_model_id` if it names a namespace, else `<user>/<hub_model_id or output_dir's name>`.

  `user` skips the whoami call when the caller already knows the account name.
  """
  hub_model_id = config.hub_model_id
  if hub_model_id and "/" in hub_model_id:
    repo_id = hub_model_id
  else:
    name = hub_model_id or (pathlib.Path(config.output_dir).resolve().name
                            if config.output_dir else "")
    if not name:
      raise UserError("--push_to_hub needs --hub_model_id or --output_dir to name the repository")
    if user is None:
      user = _whoami(token)["name"]
    repo_id = f"{user}/{name}"
  try:
    huggingface_hub.utils.validate_repo_id(repo_id)
  except huggingface_hub.errors.HFValidationError:
    raise UserError(f"{repo_id!r} is not a valid Hub repository name (letters, digits, '-', '_', "
                    "'.'); set --hub_model_id=NAME or --hub_model_id=USER/NAME") from None
  return repo_id


def check_hub_access(config: Any) -> HubTarget:
  """Before training: find the token, check it against the Hub and name the repository."""
  token = huggingface_hub.get_token()
  if not token:
    raise UserError("--push_to_hub needs a Hugging Face login: run `hf auth login` or set "
                    "HF_TOKEN, or drop --push_to_hub")
  account = _whoami(token)
  role = ((account.get("auth") or {}).get("accessToken") or {}).get("role")
  if role == "read":
    raise UserError("--push_to_hub needs a token with write access, but this Hugging Face token "
                    "is read-only; create a write token and run `hf auth login --force`")
  return HubTarget(repo_id=resolve_repo_id(config, token, user=account.get("name")), token=token)


def _is_hub_id(model_name_or_path: str | None) -> bool:
  """Whether a model path names a Hub repository rather than a local directory."""
  if not model_name_or_path or pathlib.Path(model_name_or_path).expanduser().exists():
    return False
  return bool(_HUB_ID_PATTERN.match(model_name_or_path))


def _format_value(value: Any) -> str:
  """Floats to at most 4 decimals (tiny ones like learning rates in %g); None as '-'."""
  if isinstance(value, float):
    if value != 0 and abs(value) < 1e-3:
      return f"{value:g}"
    return f"{value:.4f}".rstrip("0").rstrip(".")
  return "-" if value is None else str(value)


def _front_matter(config: Mapping[str, Any]) -> str:
  card_data = huggingface_hub.ModelCardData(
      library_name="transformers", pipeline_tag="summarization", tags=list(CARD_TAGS),
      datasets=[config["dataset_name"]] if config.get("dataset_name") else None,
      base_model=(config["model_name_or_path"] if _is_hub_id(config.get("model_name_or_path"))
                  else None),
      metrics=["rouge"])
  return f"---\n{card_data.to_yaml()}\n---\n"


def _provenance(config: Mapping[str, Any]) -> str:
  """One sentence: what the model started from and what data it was fine-tuned on."""
  model = config.get("model_name_or_path")
  if model and _is_hub_id(model):
    start = f"fine-tuned from [{model}](https://huggingface.co/{model})"
  elif model:
    start = f"fine-tuned from a local model (`{pathlib.Path(model).name}`)"
  elif config.get("config_name"):
    start = f"trained from scratch (random init of the `{config['config_name']}` config)"
  else:
    start = "trained"
  dataset = config.get("dataset_name")
  if dataset:
    subset = f" (config `{config['dataset_config']}`)" if config.get("dataset_config") else ""
    data = f"the [{dataset}](https://huggingface.co/datasets/{dataset}) dataset{subset}"
  elif config.get("train_file"):
    data = f"a local dataset (`{pathlib.Path(config['train_file']).name}`)"
  else:
    data = "an unspecified dataset"
  return f"This T5 model was {start} for summarization on {data}, with flax-sum (JAX/Flax)."


def _hyperparameter_table(config: Mapping[str, Any]) -> str:
  rows = ["| Hyper-parameter | Value |", "|---|---|"]
  for key in HYPERPARAMETER_KEYS:
    if key not in config:
      continue
    if key == "num_train_epochs" and (config.get("max_steps") or -1) > 0:
      continue  # max_steps overrides epochs.
    if key == "max_steps" and (config.get("max_steps") or -1) <= 0:
      continue
    rows.append(f"| {key} | {_format_value(config[key])} |")
  return "\n".join(rows)


def _metrics_table(results: Mapping[str, Any]) -> str:
  splits = [(prefix, title) for prefix, title in (("eval", "Validation"), ("predict", "Test"))
            if any(f"{prefix}_{name}" in results for name in METRIC_NAMES)]
  lines = []
  if splits:
    lines += ["| Metric | " + " | ".join(title for _, title in splits) + " |",
              "|---|" + "---|" * len(splits)]
    for name in METRIC_NAMES:
      if any(f"{prefix}_{name}" in results for prefix, _ in splits):
        cells = [_format_value(results.get(f"{prefix}_{name}")) for prefix, _ in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if lines:
    lines += ["", "ROUGE scores are F-measures x 100; gen_len is the mean generated length in "
              "tokens."]
  if "train_loss" in results:
    lines += ["", f"Final training loss: {_format_value(results['train_loss'])}"]
  if not lines:
    return "No evaluation results were recorded for this run."
  return "\n".join(lines).strip()


def _usage_snippet(repo_id: str, source_prefix: str) -> str:
  model_input = f"{json.dumps(source_prefix)} + document" if source_prefix else "document"
  return "\n".join([
      "```python",
      "from transformers import AutoTokenizer, T5ForConditionalGeneration",
      "",
      f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(repo_id)})",
      f"model = T5ForConditionalGeneration.from_pretrained({json.dumps(repo_id)})",
      "",
      'document = "Your long article goes here."',
      f'inputs = tokenizer({model_input}, return_tensors="pt", truncation=True)',
      "summary_ids = model.generate(**inputs)",
      "print(tokenizer.decode(summary_ids[0], skip_special_tokens=True))",
      "```",
  ])


def write_model_card(output_dir: str | pathlib.Path, config_dict: Mapping[str, Any],
                     results: Mapping[str, Any], repo_id: str | None = None) -> pathlib.Path:
  """Writes `output_dir/README.md`: front matter, provenance, hyper-parameters, metrics, usage.

  `repo_id` names the model in the title and the usage snippet (default: output_dir's name).
  """
  output_dir = pathlib.Path(output_dir)
  repo_id = repo_id or config_dict.get("hub_model_id") or output_dir.resolve().name
  title = repo_id.split("/")[-1]
  sections = [
      _front_matter(config_dict),
      f"# {title}\n",
      _provenance(config_dict) + "\n",
      "## Usage\n",
      _usage_snippet(repo_id, config_dict.get("source_prefix") or "") + "\n",
      "## Results\n",
      _metrics_table(results) + "\n",
      "## Training hyper-parameters\n",
      _hyperparameter_table(config_dict) + "\n",
      "The full configuration is in `run_config.json`; per-step losses are in `train_log.jsonl`.\n",
  ]
  card_path = output_dir / "README.md"
  card_path.write_text("\n".join(sections), encoding="utf-8")
  return card_path


def push_to_hub(target: HubTarget, output_dir: str | pathlib.Path,
                commit_message: str = DEFAULT_COMMIT_MESSAGE) -> str:
  """Creates the repository if needed and uploads output_dir (not checkpoints/); returns the
  commit URL."""
  output_dir = pathlib.Path(output_dir)
  api = huggingface_hub.HfApi(endpoint=_endpoint())
  retry = (f"nothing was lost: the model is in {output_dir}; retry with "
           f"`hf upload {target.repo_id} {output_dir} --exclude 'checkpoints/**'`")
  try:
    repo_url = api.create_repo(target.repo_id, exist_ok=True, token=target.token)
    commit = api.upload_folder(repo_id=repo_url.repo_id or target.repo_id, folder_path=output_dir,
                               commit_message=commit_message, token=target.token,
                               ignore_patterns=list(UPLOAD_IGNORE_PATTERNS))
  except HfHubHTTPError as error:
    status = error.response.status_code if error.response is not None else "?"
    reason = {401: "the token is not valid", 403: "the token cannot write to this repository",
              404: "the repository was not found"}.get(status, f"HTTP {status}")
    raise UserError(f"pushing to {target.repo_id} failed ({reason}); {retry}") from None
  except ValueError as error:  # README.md metadata rejected by the Hub.
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise UserError(f"pushing to {target.repo_id} failed ({first_line}); {retry}") from None
  except _network_error_types() as error:
    raise UserError(f"pushing to {target.repo_id} failed: cannot reach the Hub at {_endpoint()} "
                    f"({type(error).__name__}); {retry}") from None
  return commit.commit_url or commit.oid
