#!/usr/bin/env bash
# flax-sum launcher.
#   ./run.sh             train the embedded default (configs/default.py) offline on this machine
#   ./run.sh test [ARGS] run the test suite (ARGS go to pytest)
#   ./run.sh ARGS        python -m flax_sum.train ARGS (Hugging Face flags or --config.key=value)
# Installs what is missing first: into .venv, unless an environment already has flax_sum.
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

ensure_installed
if [[ $# -eq 0 ]]; then
  # The embedded default needs nothing from the network: say so, so nothing waits on it.
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
fi
exec "$PYTHON" -m flax_sum.train "$@"
