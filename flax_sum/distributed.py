"""Multi-host runs: one process per host, each driving all of its local devices with `jax.pmap`.

`initialize(config)` must run before any other JAX call. It starts `jax.distributed` from
`--coordinator_address`, `--num_processes` and `--process_id`; without them, JAX detects the
processes itself on Cloud TPU VMs and under SLURM's `srun` with more than one task; otherwise the
run is a single process and nothing is started.

Once started, the pmapped steps psum over every device of every process, each process reads only
its slice of each global batch (`flax_sum.input_pipeline`), process 0 writes every output and
Orbax writes checkpoints collectively. `barrier` and `gather_rows` cost nothing in a single
process.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flax_sum.errors import UserError

log = logging.getLogger(__name__)


def initialize(config: Any) -> bool:
  """Starts `jax.distributed` when the run spans several processes; returns whether it is
  started. Safe to call again."""
  if jax.distributed.is_initialized():
    return True
  coordinator_address = config.get("coordinator_address")
  num_processes = config.get("num_processes")
  process_id = config.get("process_id")
  if num_processes is None and (coordinator_address or process_id is not None):
    raise UserError("--coordinator_address and --process_id need --num_processes N (the number "
                    "of processes, one per host): pass it to every process")
  if num_processes is not None:
    check_process_flags(coordinator_address, num_processes, process_id)
    if num_processes == 1:
      return False
    _use_cpu_collectives()
    _start(coordinator_address=coordinator_address, num_processes=num_processes,
           process_id=process_id,
           # Flags win: without this, JAX's SLURM detection would pick one GPU per process.
           cluster_detection_method="deactivate")
    return True
  if on_cloud_tpu_vm():
    _use_cpu_collectives()
    try:
      jax.distributed.initialize()
    except ValueError as error:
      # A single TPU VM whose metadata names no workers: there is nothing to connect to.
      log.info("Not starting jax.distributed on this TPU VM (%s); running as one process", error)
      return False
    return True
  if slurm_launched_several_tasks():
    _use_cpu_collectives()
    _start(local_device_ids=slurm_local_device_ids())
    return True
  return False


def check_process_flags(coordinator_address: str | None, num_processes: int,
                        process_id: int | None) -> None:
  if num_processes < 1:
    raise UserError(f"--num_processes must be at least 1, got {num_processes}")
  if num_processes == 1:
    return
  if not coordinator_address or not re.fullmatch(r".+:\d+", coordinator_address):
    raise UserError(f"--num_processes {num_processes} needs --coordinator_address HOST:PORT (got "
                    f"{coordinator_address}): pass process 0's address, reachable from every "
                    "host, and a free port, the same on every process")
  if process_id is None or not 0 <= process_id < num_processes:
    raise UserError(f"--process_id must be 0 to {num_processes - 1} with --num_processes "
                    f"{num_processes}, got {process_id}: give each process a distinct one, 0 on "
                    "the coordinator's host")


def on_cloud_tpu_vm() -> bool:
  """JAX's own test, made when jax is imported (TPU chips and libtpu present)."""
  try:
    from jax._src import cloud_tpu_init
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def slurm_launched_several_tasks() -> bool:
  """Under `srun` (a job step) with more than one task; a batch script itself is one process."""
  return ("SLURM_JOB_ID" in os.environ and "SLURM_STEP_NODELIST" in os.environ
          and int(os.environ.get("SLURM_NTASKS", "1")) > 1)


def slurm_local_device_ids() -> list[int] | None:
  """Every GPU of the node when SLURM runs one task per node (JAX would give each task one GPU,
  the layout for one task per GPU); None leaves JAX's choice."""
  tasks_per_node = re.findall(r"(\d+)(?:\(x\d+\))?",
                              os.environ.get("SLURM_STEP_TASKS_PER_NODE",
                                             os.environ.get("SLURM_TASKS_PER_NODE", "")))
  gpus_on_node = os.environ.get("SLURM_GPUS_ON_NODE", "")
  if tasks_per_node and set(tasks_per_node) == {"1"} and gpus_on_node.isdigit():
    return list(range(int(gpus_on_node)))
  return None


def _use_cpu_collectives() -> None:
  """CPU devices of several processes need a cross-process collective library; GPUs and TPUs
  ignore this. A user's own choice (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) is kept."""
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _start(**kwargs) -> None:
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as error:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    raise UserError(f"cannot start the multi-host run ({first_line}): give every process the "
                    "same --coordinator_address HOST:PORT (reachable from every host) and "
                    "--num_processes, and each a distinct --process_id") from error
  log.info("jax.distributed started: process %d of %d", jax.process_index(),
           jax.process_count())


def is_main_process() -> bool:
  """Process 0 writes logs, results, predictions, the exported model and Hub uploads."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has got here (`name` must match across processes)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather_rows(local_rows: Any) -> Any:
  """Every process's `local_rows` (a tree of arrays, the same shapes on each process), each
  array concatenated along its first axis in process order."""
  if jax.process_count() == 1:
    return local_rows
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(local_rows, tiled=True))


class StopVote:
  """Makes every process stop after the same step when any of them gets SIGTERM or SIGINT (a
  preemption notice may reach one host only).

  Each call votes with this process's signal (a pmax over all devices) and returns the outcome
  of the previous call's vote: read one step late, it never makes the loop wait for the device.
  A single process acts on its own signal at once.
  """

  def __init__(self):
    self._p_max = None
    self._in_flight = None

  def __call__(self, received: int | None) -> int | None:
    if jax.process_count() == 1:
      return received
    if self._p_max is None:
      self._p_max = jax.pmap(lambda signum: jax.lax.pmax(signum, "devices"),
                             axis_name="devices")
    previous = self._in_flight
    self._in_flight = self._p_max(np.full(jax.local_device_count(), received or 0, np.int32))
    signum = int(np.asarray(previous)[0]) if previous is not None else 0
    return signum or None
