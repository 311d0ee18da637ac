#!/usr/bin/env bash
# flax-sum launcher.
#   ./run.sh             train the embedded default (configs/default.py) offline on this machine
#   ./run.sh test [ARGS] run the test suite (ARGS go to pytest)
#   ./run.sh ARGS        python -m flax_sum.train ARGS (Hugging Face flags or --config.key=value)
# Installs what is missing first: into .venv, unless an environment already has flax_sum.
#
# Multi-host GPU runs take torchrun's flags, one ./run.sh per host (one process drives all of a
# host's GPUs): --nnodes N --node_rank R --master_addr A --master_port P become
# --num_processes N --process_id R --coordinator_address A:P; --nproc_per_node is ignored.
# Unless already set: XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (JAX preallocates 90% of each GPU's
# memory instead of 75%; the rest is left to NCCL and cuDNN).
# FLAX_SUM_DRY_RUN=1 prints the training command instead of running it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

REQUIRED_MODULES="flax_sum jax flax optax orbax.checkpoint transformers datasets rouge_score \
ml_collections sentencepiece safetensors huggingface_hub tqdm"

missing_modules() {  # prints the modules $1 cannot import (find_spec: nothing is imported)
  "$1" - "$REQUIRED_MODULES" "${2:-}" <<'PY'
import importlib.util, sys
names = sys.argv[1].split() + sys.argv[2].split()
print(" ".join(n for n in names if importlib.util.find_spec(n.split(".")[0]) is None
               or (n == "flax_sum" and not importlib.util.find_spec(n).origin)))
PY
}

has_flax_sum() {  # run outside the repository, so its flax_sum/ folder does not count
  command -v "$1" >/dev/null && (cd / && "$1" -c "import flax_sum") >/dev/null 2>&1
}

choose_python() {
  if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
  elif has_flax_sum python; then
    PYTHON=$(command -v python)   # an environment that already has flax_sum installed
  elif has_flax_sum python3; then
    PYTHON=$(command -v python3)
  else
    local base=${FLAX_SUM_PYTHON:-python3}
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "error: flax-sum needs Python 3.11 or newer; set FLAX_SUM_PYTHON=/path/to/python3.11" >&2
      exit 2
    fi
    echo "Creating .venv with $("$base" --version) ..."
    "$base" -m venv .venv
    PYTHON=.venv/bin/python
  fi
}

ensure_installed() {  # $1: extra modules needed by this command
  local missing
  missing=$(missing_modules "$PYTHON" "${1:-}")
  if [[ -n "$missing" ]]; then
    echo "Installing flax-sum and its dependencies into $("$PYTHON" -c 'import sys; print(sys.prefix)') (missing: $missing) ..."
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
  fi
}

choose_python
if [[ "${1:-}" == "test" ]]; then
  shift
  ensure_installed pytest
  set +e
  "$PYTHON" -m pytest tests "$@"
  status=$?
  set -e
  if [[ $status -eq 5 ]]; then
    echo "error: pytest collected no tests (exit code 5): check the test paths or -k expression" >&2
    exit 1
  fi
  exit $status
fi

fail() { echo "error: $*" >&2; exit 2; }

# torchrun's launcher flags (with - or _, with a space or =) -> flax_sum.train's multi-host flags.
TRAIN_ARGS=() NNODES="" NODE_RANK="" MASTER_ADDR="" MASTER_PORT=""
while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  name=${arg%%=*}
  case "${name//-/_}" in
    __nnodes|__node_rank|__master_addr|__master_port|__nproc_per_node)
      if [[ "$arg" == *=* ]]; then
        value=${arg#*=}
      else
        [[ $# -gt 0 ]] || fail "$name expects a value"
        value=$1
        shift
      fi
      case "${name//-/_}" in
        __nnodes) NNODES=$value ;;
        __node_rank) NODE_RANK=$value ;;
        __master_addr) MASTER_ADDR=$value ;;
        __master_port) MASTER_PORT=$value ;;
        __nproc_per_node) echo "note: $name $value is ignored: one process drives all of this" \
          "host's GPUs (jax.pmap); run one ./run.sh per host" >&2 ;;
      esac ;;
    *) TRAIN_ARGS+=("$arg") ;;
  esac
done
if [[ -n "$NNODES" ]]; then
  [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || fail "--nnodes $NNODES is not supported: pass the number" \
    "of hosts (elastic ranges such as 1:4 are not)"
  if [[ "$NNODES" -gt 1 ]]; then
    [[ -n "$MASTER_ADDR" ]] || fail "--nnodes $NNODES needs --master_addr: pass the address of" \
      "the host with --node_rank 0, reachable from every host"
    [[ "${NODE_RANK:-0}" =~ ^[0-9]+$ && "${NODE_RANK:-0}" -lt "$NNODES" ]] || fail "--node_rank" \
      "must be 0 to $((NNODES - 1)) with --nnodes $NNODES, got ${NODE_RANK}"
    TRAIN_ARGS+=(--num_processes "$NNODES" --process_id "${NODE_RANK:-0}"
                 --coordinator_address "$MASTER_ADDR:${MASTER_PORT:-29500}")
  fi
elif [[ -n "$NODE_RANK$MASTER_ADDR$MASTER_PORT" ]]; then
  fail "--node_rank, --master_addr and --master_port need --nnodes N (the number of hosts)"
fi
set -- ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [[ $# -eq 0 ]]; then
  # The embedded default needs nothing from the network: say so, so nothing waits on it.
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
fi
if [[ -n "${FLAX_SUM_DRY_RUN:-}" ]]; then
  printf '%q' "$PYTHON"
  printf ' %q' -m flax_sum.train "$@"
  echo
  exit 0
fi
ensure_installed
exec "$PYTHON" -m flax_sum.train "$@"
