#!/usr/bin/env bash
# Source this: finds a Python >= 3.12, creates .venv beside the repo and installs the project
# with the extras named in $VALORA_EXTRAS (e.g. "test"), pinned to constraints.txt. Adds the
# `cuda` extra (JAX's CUDA wheels) when nvidia-smi finds a GPU, unless VALORA_CUDA=0.
# Leaves VENV_PY pointing at the venv's python.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/find_python.sh"

if [ ! -x "$REPO/.venv/bin/python" ] || ! python_ok "$REPO/.venv/bin/python"; then
    PY="$(find_python)"
    echo "setting up $REPO/.venv with $PY" >&2
    "$PY" -m venv "$REPO/.venv"
fi
VENV_PY="$REPO/.venv/bin/python"
extras="${VALORA_EXTRAS:-}"
if [ "${VALORA_CUDA:-1}" != 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="${extras:+$extras,}cuda"
    echo "nvidia-smi found a GPU: installing JAX's CUDA wheels (VALORA_CUDA=0 to skip)" >&2
fi
"$VENV_PY" -m pip install -q --upgrade pip >&2
"$VENV_PY" -m pip install -q -c "$REPO/constraints.txt" -e "$REPO${extras:+[$extras]}" >&2
