"""flax_sum.hub against a local fake Hub: nothing here reaches huggingface.co."""

from __future__ import annotations

import base64
import http.server
import json
import pathlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from huggingface_hub import constants as hub_constants

from flax_sum import config as config_lib
from flax_sum import hub
from flax_sum.errors import UserError

TOKEN = "hf_test_token"
USER = "tester"
COMMIT_OID = "c0ffee" + "0" * 34
RESULTS = {
    "train_loss": 2.345678, "epoch": 3.0,
    "eval_loss": 1.87654, "eval_rouge1": 41.23456, "eval_rouge2": 18.5, "eval_rougeL": 29.0,
    "eval_rougeLsum": 38.1, "eval_gen_len": 57.25, "eval_samples": 100,
    "predict_loss": 1.9, "predict_rouge1": 40.5, "predict_rouge2": 17.75, "predict_rougeL": 28.5,
    "predict_rougeLsum": 37.0, "predict_gen_len": 58.0, "predict_samples": 100,
}
# What training leaves in output_dir; checkpoints/ must stay local.
UPLOADED_FILES = {
    "config.json": b'{"model_type": "t5"}', "model.safetensors": b"\x00" * 2048,
    "generation_config.json": b"{}", "tokenizer.json": b"{}", "tokenizer_config.json": b"{}",
    "spiece.model": b"\x01\x02", "train_results.json": b"{}", "eval_results.json": b"{}",
    "predict_results.json": b"{}", "all_results.json": json.dumps(RESULTS).encode(),
    "generated_predictions.txt": b"a summary\n", "train_log.jsonl": b'{"step": 1}\n',
    "run_config.json": b"{}", "runs/events.out.tfevents.1.host": b"tb",
}
LOCAL_ONLY_FILES = {
    "checkpoints/100/default/_METADATA": b"orbax", "checkpoints/100/_CHECKPOINT_METADATA": b"{}",
    "partial.tmp": b"",
}


class FakeHub:
  """Records every request; answers whoami, repos/create, validate-yaml, preupload, commit."""

  def __init__(self) -> None:
    self.requests: list[dict[str, Any]] = []
    self.repos_created: list[dict[str, Any]] = []
    self.commits: list[dict[str, Any]] = []
    self.whoami_status = 200
    self.token_role = "write"
    self.commit_status = 200
    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
    self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
    self.thread = threading.Thread(target=self.server.serve_forever,
                                   kwargs={"poll_interval": 0.05}, daemon=True)

  def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args: Any) -> None:
        pass

      def do_GET(self) -> None:
        fake.handle(self, "GET")

      def do_POST(self) -> None:
        fake.handle(self, "POST")

    return Handler

  def handle(self, request: http.server.BaseHTTPRequestHandler, method: str) -> None:
    body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
    path = request.path.split("?")[0]
    if path == "/api/agent-harnesses":  # huggingface_hub's own unauthenticated user-agent lookup.
      return self._reply(request, 200, {"standardEnvVars": [], "harnesses": {}})
    self.requests.append({"method": method, "path": path, "body": body,
                          "authorization": request.headers.get("Authorization")})
    if request.headers.get("Authorization") != f"Bearer {TOKEN}":
      return self._reply(request, 401, {"error": "Invalid credentials in Authorization header"})
    if method == "GET" and path == "/api/whoami-v2":
      if self.whoami_status != 200:
        return self._reply(request, self.whoami_status, {"error": "Invalid username or password."})
      return self._reply(request, 200, {"type": "user", "name": USER,
                                        "auth": {"accessToken": {"role": self.token_role}}})
    if method == "POST" and path == "/api/repos/create":
      payload = json.loads(body)
      self.repos_created.append(payload)
      return self._reply(request, 200,
                         {"url": f"{self.endpoint}/{payload['organization']}/{payload['name']}"})
    if method == "POST" and path == "/api/validate-yaml":
      return self._reply(request, 200, {"errors": [], "warnings": []})
    if method == "POST" and path.startswith("/api/models/") and "/preupload/" in path:
      files = json.loads(body)["files"]
      return self._reply(request, 200, {"files": [
          {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
          for f in files]})
    if method == "POST" and path.startswith("/api/models/") and "/commit/" in path:
      if self.commit_status != 200:
        return self._reply(request, self.commit_status, {"error": "Forbidden"})
      lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
      repo_id = path[len("/api/models/"):].split("/commit/")[0]
      self.commits.append({
          "repo_id": repo_id, "header": lines[0]["value"],
          "files": {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                    for item in lines[1:] if item["key"] == "file"},
          "other_keys": [item["key"] for item in lines[1:] if item["key"] != "file"]})
      commit_url = f"{self.endpoint}/{repo_id}/commit/{COMMIT_OID}"
      return self._reply(request, 200, {"commitUrl": commit_url, "commitOid": COMMIT_OID,
                                        "pullRequestUrl": None})
    return self._reply(request, 404, {"error": f"fake hub does not serve {method} {path}"})

  @staticmethod
  def _reply(request: http.server.BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str,
                  hf_home: pathlib.Path) -> None:
  """huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE at import: patch the constants as well."""
  monkeypatch.setattr(hub_constants, "AGENT_HARNESSES_PATH",
                      str(hf_home / "agent_harnesses.json"), raising=False)
  monkeypatch.setenv("HF_ENDPOINT", endpoint)
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
  monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setenv("HF_TOKEN", TOKEN)
  monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
  monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[FakeHub]:
  fake = FakeHub()
  fake.thread.start()
  _point_hub_at(monkeypatch, fake.endpoint, tmp_path_factory.mktemp("hf_home"))
  yield fake
  fake.server.shutdown()
  fake.server.server_close()


def _config(output_dir: pathlib.Path, **overrides: Any) -> Any:
  config = config_lib.base_config()
  config.output_dir = str(output_dir)
  config.push_to_hub = True
  config.model_name_or_path = "google-t5/t5-small"
  config.dataset_name = "knkarthick/dialogsum"
  config.source_prefix = "summarize: "
  config.learning_rate = 3e-4
  config.max_steps = 200
  for key, value in overrides.items():
    config[key] = value
  return config


def _write_run(output_dir: pathlib.Path) -> None:
  for name, content in {**UPLOADED_FILES, **LOCAL_ONLY_FILES}.items():
    path = output_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_push_uploads_model_card_and_results_but_not_checkpoints(fake_hub, tmp_path):
  output_dir = tmp_path / "dialogsum-t5"
  _write_run(output_dir)
  config = _config(output_dir)

  target = hub.check_hub_access(config)
  assert target.repo_id == f"{USER}/dialogsum-t5"
  assert TOKEN not in repr(target)
  hub.write_model_card(output_dir, config.to_dict(), RESULTS, repo_id=target.repo_id)
  commit_url = hub.push_to_hub(target, output_dir, commit_message="flax-sum run")

  assert commit_url == f"{fake_hub.endpoint}/{USER}/dialogsum-t5/commit/{COMMIT_OID}"
  assert fake_hub.repos_created == [{"name": "dialogsum-t5", "organization": USER}]
  (commit,) = fake_hub.commits
  assert commit["repo_id"] == f"{USER}/dialogsum-t5"
  assert commit["header"]["summary"] == "flax-sum run"
  assert set(commit["files"]) == set(UPLOADED_FILES) | {"README.md"}
  assert commit["other_keys"] == []
  assert commit["files"]["model.safetensors"] == UPLOADED_FILES["model.safetensors"]
  card = commit["files"]["README.md"].decode()
  assert "| rouge1 | 41.2346 | 40.5 |" in card
  assert f'T5ForConditionalGeneration.from_pretrained("{USER}/dialogsum-t5")' in card
  assert all(request["authorization"] == f"Bearer {TOKEN}" for request in fake_hub.requests)
  for path in output_dir.rglob("*"):
    if path.is_file():
      assert TOKEN.encode() not in path.read_bytes(), path


def test_model_card_content(tmp_path):
  config = _config(tmp_path, dataset_config="v1", max_steps=-1, num_train_epochs=2.0)
  card = hub.write_model_card(tmp_path, config.to_dict(), RESULTS, repo_id="org/my-t5").read_text()
  _, front_matter, body = card.split("---\n", 2)
  metadata = yaml.safe_load(front_matter)
  assert metadata["library_name"] == "transformers"
  assert metadata["tags"] == ["summarization", "t5", "flax-sum"]
  assert metadata["datasets"] == ["knkarthick/dialogsum"]
  assert metadata["base_model"] == "google-t5/t5-small"
  assert metadata["metrics"] == ["rouge"]
  assert "license" not in metadata
  assert body.lstrip().startswith("# my-t5")
  assert "config `v1`" in body
  assert "| Metric | Validation | Test |" in body
  for row in ("| rouge2 | 18.5 | 17.75 |", "| rougeL | 29 | 28.5 |", "| rougeLsum | 38.1 | 37 |",
              "| loss | 1.8765 | 1.9 |", "| gen_len | 57.25 | 58 |"):
    assert row in body
  assert "Final training loss: 2.3457" in body
  assert "| learning_rate | 0.0003 |" in body
  assert "| num_train_epochs | 2 |" in body and "| max_steps |" not in body
  assert "| per_device_train_batch_size | 8 |" in body and "| seed | 42 |" in body
  assert 'tokenizer("summarize: " + document' in body
  assert "model.generate(**inputs)" in body


def test_model_card_from_local_model_and_file_data_has_no_hub_links(tmp_path):
  local_model = tmp_path / "my_local_t5"
  local_model.mkdir()
  config = _config(tmp_path, model_name_or_path=str(local_model), dataset_name=None,
                   train_file=str(tmp_path / "train.jsonl"), source_prefix="")
  card = hub.write_model_card(tmp_path, config.to_dict(), {}).read_text()
  metadata = yaml.safe_load(card.split("---\n")[1])
  assert "base_model" not in metadata and "datasets" not in metadata
  assert "| max_steps | 200 |" in card and "| num_train_epochs |" not in card
  assert "No evaluation results were recorded" in card
  assert f'from_pretrained("{tmp_path.name}")' in card
  assert "tokenizer(document" in card


def test_resolve_repo_id(fake_hub, tmp_path):
  config = _config(tmp_path / "run-1", hub_model_id="my-org/summarizer")
  assert hub.resolve_repo_id(config, TOKEN) == "my-org/summarizer"
  assert fake_hub.requests == []  # A full id needs no whoami.
  assert hub.resolve_repo_id(_config(tmp_path / "run-1", hub_model_id="t5-dialog"),
                             TOKEN) == f"{USER}/t5-dialog"
  assert hub.resolve_repo_id(_config(tmp_path / "run-1" / ""), TOKEN) == f"{USER}/run-1"
  with pytest.raises(UserError, match="not a valid Hub repository name"):
    hub.resolve_repo_id(_config(tmp_path / "my run"), TOKEN)


def _assert_one_line(error: pytest.ExceptionInfo[UserError]) -> str:
  message = str(error.value)
  assert "\n" not in message and TOKEN not in message
  return message


def test_no_token_fails_before_any_request(fake_hub, monkeypatch, tmp_path):
  monkeypatch.delenv("HF_TOKEN")
  monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
  with pytest.raises(UserError, match="needs a Hugging Face login") as error:
    hub.check_hub_access(_config(tmp_path / "out"))
  assert "hf auth login" in _assert_one_line(error)
  assert fake_hub.requests == []


def test_invalid_token_is_reported(fake_hub, tmp_path):
  fake_hub.whoami_status = 401
  with pytest.raises(UserError, match="token is not valid") as error:
    hub.check_hub_access(_config(tmp_path / "out"))
  _assert_one_line(error)
  assert fake_hub.repos_created == []


def test_read_only_token_is_refused_before_training(fake_hub, tmp_path):
  fake_hub.token_role = "read"
  with pytest.raises(UserError, match="read-only") as error:
    hub.check_hub_access(_config(tmp_path / "out"))
  _assert_one_line(error)


def test_unreachable_hub_is_reported(monkeypatch, tmp_path):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    closed_port = sock.getsockname()[1]
  endpoint = f"http://127.0.0.1:{closed_port}"
  _point_hub_at(monkeypatch, endpoint, tmp_path)
  with pytest.raises(UserError, match="cannot reach the Hub") as error:
    hub.check_hub_access(_config(tmp_path / "out"))
  message = _assert_one_line(error)
  assert endpoint in message and "drop --push_to_hub" in message


def test_offline_mode_is_reported(fake_hub, monkeypatch, tmp_path):
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(UserError, match="offline mode") as error:
    hub.check_hub_access(_config(tmp_path / "out"))
  assert "HF_HUB_OFFLINE" in _assert_one_line(error)
  assert fake_hub.requests == []


def test_failed_upload_says_how_to_retry(fake_hub, tmp_path):
  output_dir = tmp_path / "out"
  _write_run(output_dir)
  fake_hub.commit_status = 403  # Not retried (5xx are, with backoff).
  target = hub.check_hub_access(_config(output_dir))
  with pytest.raises(UserError, match="nothing was lost") as error:
    hub.push_to_hub(target, output_dir)
  message = _assert_one_line(error)
  assert f"hf upload {USER}/out {output_dir}" in message and "cannot write" in message


def _tiny_training_flags(root: pathlib.Path) -> list[str]:
  from test_train import TINY_T5, write_csv  # The end-to-end tests' tiny model and data.
  (root / "config.json").write_text(json.dumps(TINY_T5))
  return ["--config_name", str(root / "config.json"),
          "--train_file", write_csv(root / "train.csv", 16),
          "--validation_file", write_csv(root / "dev.csv", 3),
          "--text_column", "conversation", "--summary_column", "gist",
          "--max_source_length", "16", "--max_target_length", "6",
          "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
          "--max_steps", "2", "--do_train", "--do_eval", "--predict_with_generate"]


def test_training_with_push_to_hub_uploads_the_run(fake_hub, tmp_path):
  from flax_sum import train
  output_dir = tmp_path / "dialogsum-tiny"
  status = train.main([*_tiny_training_flags(tmp_path), "--output_dir", str(output_dir),
                       "--push_to_hub", "--push_to_hub_model_id", "my-tiny-t5"])
  assert status == 0
  [created] = fake_hub.repos_created
  assert "my-tiny-t5" in json.dumps(created)
  [commit] = fake_hub.commits
  assert commit["repo_id"] == f"{USER}/my-tiny-t5"
  files = commit["files"]
  assert files["model.safetensors"] == (output_dir / "model.safetensors").read_bytes()
  assert {"config.json", "README.md", "all_results.json", "eval_results.json",
          "train_results.json", "tokenizer.json"} <= set(files)
  assert not [name for name in files if name.startswith("checkpoints/")]
  card = files["README.md"].decode()
  assert f"{USER}/my-tiny-t5" in card
  eval_loss = json.loads((output_dir / "eval_results.json").read_text())["eval_loss"]
  assert f"| {eval_loss:.4f}".rstrip("0") in card  # The card's metrics table.
  for path in output_dir.rglob("*"):
    if path.is_file():
      assert TOKEN.encode() not in path.read_bytes(), path


def test_training_with_push_to_hub_but_no_login_fails_before_training(fake_hub, monkeypatch,
                                                                       tmp_path, capsys):
  from flax_sum import train
  monkeypatch.delenv("HF_TOKEN")
  monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
  output_dir = tmp_path / "out"
  status = train.main([*_tiny_training_flags(tmp_path), "--output_dir", str(output_dir),
                       "--push_to_hub"])
  assert status == 2
  assert "needs a Hugging Face login" in capsys.readouterr().err
  assert not (output_dir / "checkpoints").exists()
  assert fake_hub.requests == []
