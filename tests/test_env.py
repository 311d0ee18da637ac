"""`python -m flax_sum.env`: the environment report and the per-device smoke test."""

import json

import jax

from flax_sum import env


def test_env_reports_versions_devices_and_a_passing_smoke_test_on_every_device(capsys):
  assert env.main(["--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["packages"]["jax"] == jax.__version__
  assert report["packages"]["flax-sum"] is not None
  assert report["backend"] == "cpu" and report["bf16_native"] is False
  assert report["local_device_count"] == report["device_count"] == 8
  assert report["process_count"] == 1
  smoke = report["smoke_test"]
  assert smoke["ok"] is True
  assert len(smoke["per_device_loss"]) == 8
  assert len(set(smoke["per_device_loss"].values())) == 1
  assert abs(smoke["pmap_loss"] - next(iter(smoke["per_device_loss"].values()))) < 1e-5


def test_env_text_report_without_the_smoke_test(capsys):
  assert env.main(["--skip_test"]) == 0
  out = capsys.readouterr().out
  assert "backend: cpu" in out and "local_device_count: 8" in out
  assert "smoke test" not in out
