"""Multi-host runs: 2 processes x 4 devices match 1 process x 8; run.sh maps torchrun's flags.

Each run is `python -m flax_sum.train` in subprocesses with their own device count (this test
process's jax already sees 8 devices); the processes of a multi-host run meet at a coordinator
on 127.0.0.1 and exchange over gloo, JAX's CPU collectives.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from flax_sum import distributed
from flax_sum import train
from test_train import TINY_T5, write_csv

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def cpu_env(devices_per_process: int, cache_dir: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                             env.get("XLA_FLAGS", ""))
                      + f" --xla_force_host_platform_device_count={devices_per_process}")
  env["JAX_PLATFORMS"] = "cpu"
  # Later runs reuse the compiled steps of earlier ones with the same layout.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  return env


def launch(flags, output_dir, *, processes, devices_per_process, cache_dir):
  """Starts the run's processes; their output goes to output_dir's sibling log files."""
  env = cpu_env(devices_per_process, cache_dir)
  command = [sys.executable, "-m", "flax_sum.train", *flags, "--output_dir", str(output_dir)]
  if processes > 1:
    coordinator = f"127.0.0.1:{free_port()}"
    commands = [[*command, "--num_processes", str(processes), "--process_id", str(index),
                 "--coordinator_address", coordinator] for index in range(processes)]
  else:
    commands = [command]
  started = []
  for index, process_command in enumerate(commands):
    log_path = output_dir.parent / f"{output_dir.name}.process{index}"
    stdout, stderr = open(f"{log_path}.out", "w"), open(f"{log_path}.err", "w")
    started.append((subprocess.Popen(process_command, cwd=REPO_ROOT, env=env, stdout=stdout,
                                     stderr=stderr), log_path))
  return started


def wait_for(started) -> list[str]:
  """Every process's stdout, once all exited with 0; kills the rest if one fails."""
  outputs = []
  try:
    for process, log_path in started:
      process.wait(timeout=RUN_TIMEOUT_S)
      stderr = pathlib.Path(f"{log_path}.err").read_text()
      assert process.returncode == 0, f"{log_path.name} exited {process.returncode}:\n" + (
          stderr[-3000:])
      outputs.append(pathlib.Path(f"{log_path}.out").read_text())
  finally:
    for process, _ in started:
      if process.poll() is None:
        process.kill()
        process.wait()
  return outputs


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def train_log(output_dir):
  return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same tiny train + eval + predict run on 1 process x 8 devices and 2 x 4, at once."""
  root = tmp_path_factory.mktemp("multihost")
  (root / "config.json").write_text(json.dumps(TINY_T5))
  # 11 validation rows: two eval batches of 8, the second one padded; 5 test rows: one.
  train_flags = [
      "--config_name", str(root / "config.json"), "--train_file", write_csv(root / "train.csv", 40),
      "--text_column", "conversation", "--summary_column", "gist", "--source_prefix",
      "summarize: ", "--max_source_length", "32", "--max_target_length", "8",
      "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1",
      "--learning_rate", "1e-2", "--max_steps", "6", "--logging_steps", "2", "--save_steps", "3",
      "--do_train"]
  flags = [*train_flags, "--validation_file", write_csv(root / "dev.csv", 11), "--test_file",
           write_csv(root / "test.csv", 5), "--do_eval", "--do_predict",
           "--predict_with_generate", "--eval_steps", "3"]
  cache_dir = root / "jax-cache"
  one_process = launch(flags, root / "one", processes=1, devices_per_process=8,
                       cache_dir=cache_dir)
  two_processes = launch(flags, root / "two", processes=2, devices_per_process=4,
                         cache_dir=cache_dir)
  return {"root": root, "train_flags": train_flags, "cache_dir": cache_dir,
          "one": root / "one", "one_stdout": wait_for(one_process),
          "two": root / "two", "two_stdout": wait_for(two_processes)}


def test_two_processes_of_four_devices_train_the_params_of_one_process_of_eight(runs):
  assert "8 cpu device(s) in 1 process(es)" in runs["one_stdout"][0]
  assert "8 cpu device(s) in 2 process(es)" in runs["two_stdout"][0]
  for stdout in (runs["one_stdout"][0], runs["two_stdout"][0]):
    assert "global batch 16 on 8 devices" in stdout
  expected = safetensors.numpy.load_file(runs["one"] / "model.safetensors")
  actual = safetensors.numpy.load_file(runs["two"] / "model.safetensors")
  assert sorted(actual) == sorted(expected)
  for name, value in expected.items():
    assert value.dtype == np.float32
    np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-6, err_msg=name)
  assert (read_json(runs["two"] / "train_results.json")["train_loss"]
          == pytest.approx(read_json(runs["one"] / "train_results.json")["train_loss"],
                           rel=1e-6))


def test_eval_and_predict_gather_every_process_rows_in_dataset_order(runs):
  for split in ("eval", "predict"):
    expected = read_json(runs["one"] / f"{split}_results.json")
    actual = read_json(runs["two"] / f"{split}_results.json")
    assert sorted(actual) == sorted(expected)
    assert actual[f"{split}_samples"] == {"eval": 11, "predict": 5}[split]
    for key, value in expected.items():
      if key.endswith(("_loss", "_accuracy")):
        assert actual[key] == pytest.approx(value, rel=1e-6), key
      else:  # ROUGE, gen_len and samples are computed from the same generated tokens.
        assert actual[key] == value, key
  predictions = (runs["two"] / "generated_predictions.txt").read_text()
  assert predictions == (runs["one"] / "generated_predictions.txt").read_text()
  assert len(predictions.splitlines()) == 5
  # The evaluation during training (step 3) gathered the same way.
  expected_log, actual_log = train_log(runs["one"]), train_log(runs["two"])
  assert [sorted(r) for r in actual_log] == [sorted(r) for r in expected_log]
  for expected_record, actual_record in zip(expected_log, actual_log):
    for key in ("eval_loss", "eval_rouge1", "eval_gen_len", "loss"):
      if key in expected_record:
        assert actual_record[key] == pytest.approx(expected_record[key], rel=1e-6), key


def test_only_process_0_writes_the_outputs(runs):
  two = runs["two"]
  # One writer: each record once, one TensorBoard event file, the checkpoints once.
  assert [r["step"] for r in train_log(two)] == [2, 3, 4, 6]
  event_files = [path.name for path in (two / "runs").glob("events.out.tfevents.*")]
  assert len(event_files) == len(list((runs["one"] / "runs").glob("events.out.tfevents.*")))
  assert len({name.split(".")[-2] for name in event_files}) == 1  # Named .PID.N: one writer.
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["3", "6"]
  assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in runs["one"].iterdir())
  # Process 1 logs warnings only.
  assert "Saved the model" in runs["two_stdout"][0]
  assert "Saved the model" not in runs["two_stdout"][1]
  assert "Training steps" not in runs["two_stdout"][1]


def test_a_two_process_run_resumes_exactly(runs):
  # Interrupted after step 3 and resumed from it; step 6 of the earlier attempt is set aside
  # and the checkpoint resumed from is deleted once a newer one is complete (process 0 only).
  resumed_dir = runs["root"] / "resumed"
  for step in ("3", "6"):
    shutil.copytree(runs["two"] / "checkpoints" / step, resumed_dir / "checkpoints" / step)
  started = launch([*runs["train_flags"], "--save_total_limit", "1",
                    "--resume_from_checkpoint", str(resumed_dir / "checkpoints" / "3")],
                   resumed_dir, processes=2, devices_per_process=4,
                   cache_dir=runs["cache_dir"])
  stdout = wait_for(started)[0]
  assert f"Resuming from checkpoint {resumed_dir.resolve()}/checkpoints/3 at step 3" in stdout
  assert ((resumed_dir / "model.safetensors").read_bytes()
          == (runs["two"] / "model.safetensors").read_bytes())
  assert (read_json(resumed_dir / "train_results.json")["train_loss"]
          == read_json(runs["two"] / "train_results.json")["train_loss"])
  assert sorted(p.name for p in (resumed_dir / "checkpoints").iterdir()) == ["6", "stale-6"]


@pytest.mark.parametrize("flags, message", [
    (["--num_processes", "2"],
     "--num_processes 2 needs --coordinator_address HOST:PORT (got None): pass process 0's "
     "address, reachable from every host, and a free port, the same on every process"),
    (["--num_processes", "2", "--coordinator_address", "10.0.0.1:1234"],
     "--process_id must be 0 to 1 with --num_processes 2, got None: give each process a "
     "distinct one, 0 on the coordinator's host"),
    (["--num_processes", "2", "--coordinator_address", "10.0.0.1", "--process_id", "1"],
     "--num_processes 2 needs --coordinator_address HOST:PORT (got 10.0.0.1): pass process "
     "0's address, reachable from every host, and a free port, the same on every process"),
    (["--process_id", "1"],
     "--coordinator_address and --process_id need --num_processes N (the number of processes, "
     "one per host): pass it to every process"),
    (["--num_processes", "0"], "--num_processes must be at least 1, got 0"),
])
def test_incomplete_multi_host_flags_are_refused(tmp_path, capsys, flags, message):
  output_dir = tmp_path / "out"
  assert train.main([*flags, "--output_dir", str(output_dir)]) == 2
  assert capsys.readouterr().err == f"error: {message}\n"
  assert not output_dir.exists()


@pytest.mark.parametrize("tasks_per_node, gpus, expected", [
    ("1(x4)", "8", list(range(8))),   # One task per node: it drives every GPU.
    ("8(x2)", "8", None),             # One task per GPU: JAX's own choice.
    ("1(x4)", None, None),            # No GPUs allocated.
])
def test_slurm_tasks_drive_every_gpu_of_their_node_when_alone(monkeypatch, tasks_per_node, gpus,
                                                              expected):
  monkeypatch.delenv("SLURM_STEP_TASKS_PER_NODE", raising=False)
  monkeypatch.setenv("SLURM_TASKS_PER_NODE", tasks_per_node)
  if gpus is None:
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
  else:
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", gpus)
  assert distributed.slurm_local_device_ids() == expected


def test_only_srun_with_several_tasks_counts_as_a_slurm_multi_host_run(monkeypatch):
  for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.slurm_launched_several_tasks()
  monkeypatch.setenv("SLURM_JOB_ID", "17")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert not distributed.slurm_launched_several_tasks()  # The batch script, not an srun step.
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[001-004]")
  assert distributed.slurm_launched_several_tasks()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not distributed.slurm_launched_several_tasks()


def dry_run(*args):
  """run.sh's final command as argv, and its stderr."""
  env = {**os.environ, "FLAX_SUM_DRY_RUN": "1"}
  result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)
  return result.returncode, shlex.split(result.stdout), result.stderr


def test_run_sh_maps_torchrun_flags_onto_the_multi_host_flags():
  status, command, stderr = dry_run("--nnodes", "2", "--node_rank", "1", "--master_addr",
                                    "10.0.0.1", "--master_port", "1234", "--nproc_per_node", "8",
                                    "--max_steps", "5", "--source_prefix", "summarize: ")
  assert status == 0, stderr
  assert command[1:] == ["-m", "flax_sum.train", "--max_steps", "5", "--source_prefix",
                         "summarize: ", "--num_processes", "2", "--process_id", "1",
                         "--coordinator_address", "10.0.0.1:1234"]
  assert stderr.startswith("note: --nproc_per_node 8 is ignored: one process drives all of "
                           "this host's GPUs")
  # torchrun's other spellings; its default port.
  status, command, _ = dry_run("--nnodes=2", "--node-rank=0", "--master-addr=host0")
  assert status == 0
  assert command[3:] == ["--num_processes", "2", "--process_id", "0", "--coordinator_address",
                         "host0:29500"]
  # One node is a single process.
  status, command, _ = dry_run("--nnodes", "1", "--do_eval")
  assert status == 0 and command[1:] == ["-m", "flax_sum.train", "--do_eval"]


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "error: --nnodes 2 needs --master_addr: pass the address of the host "
     "with --node_rank 0, reachable from every host"),
    (["--nnodes", "2", "--node_rank", "2", "--master_addr", "h"],
     "error: --node_rank must be 0 to 1 with --nnodes 2, got 2"),
    (["--nnodes", "1:4"], "error: --nnodes 1:4 is not supported: pass the number of hosts "
     "(elastic ranges such as 1:4 are not)"),
    (["--master_addr", "h"], "error: --node_rank, --master_addr and --master_port need --nnodes "
     "N (the number of hosts)"),
])
def test_run_sh_refuses_incomplete_torchrun_flags(args, message):
  status, command, stderr = dry_run(*args)
  assert status == 2 and command == []
  assert stderr.strip() == message


def test_sigterm_on_one_host_stops_every_host_after_the_same_step(runs):
  # A preemption notice reaches one host only; both must save the same step and stop.
  output_dir = runs["root"] / "preempted"
  flags = [*runs["train_flags"], "--max_steps", "30", "--save_steps", "100", "--logging_steps",
           "1"]
  started = launch(flags, output_dir, processes=2, devices_per_process=4,
                   cache_dir=runs["cache_dir"])
  try:
    (process_0, log_0), (process_1, log_1) = started
    train_log_path, last_step = output_dir / "train_log.jsonl", 0
    while process_1.poll() is None and last_step < 3:
      lines = train_log_path.read_text().splitlines() if train_log_path.exists() else []
      last_step = json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0
      time.sleep(0.05)
    process_1.send_signal(signal.SIGTERM)
    for process in (process_0, process_1):
      process.wait(timeout=RUN_TIMEOUT_S)
  finally:
    for process, _ in started:
      if process.poll() is None:
        process.kill()
        process.wait()
  messages = [pathlib.Path(f"{log_path}.err").read_text() for log_path in (log_0, log_1)]
  assert [process_0.returncode, process_1.returncode] == [128 + signal.SIGTERM] * 2, messages
  stopped_steps = [re.findall(r"stopped by SIGTERM after step (\d+) of 30", message)
                   for message in messages]
  assert len(stopped_steps[0]) == 1 and stopped_steps[0] == stopped_steps[1], messages
  stopped_step = int(stopped_steps[0][0])
  assert 3 <= stopped_step < 30
  assert (output_dir / "checkpoints" / str(stopped_step)).is_dir()
  assert not (output_dir / "model.safetensors").exists()
