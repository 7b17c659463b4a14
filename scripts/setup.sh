#!/usr/bin/env bash
# Source this: finds a Python >= 3.12, creates .venv beside the repo and installs the project
# (with the extras named in $VALORA_EXTRAS, e.g. "test"). Leaves VENV_PY pointing at its python.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local c
    for c in "${PYTHON:-}" python3.13 python3.12 python3 python \
             "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
        [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && _ok "$c" && { command -v "$c"; return; }
    done
    echo "error: no Python >= 3.12 found; install one or set PYTHON=/path/to/python3.12" >&2
    return 1
}

if [ ! -x "$REPO/.venv/bin/python" ] || ! _ok "$REPO/.venv/bin/python"; then
    PY="$(find_python)"
    echo "setting up $REPO/.venv with $PY" >&2
    "$PY" -m venv "$REPO/.venv"
fi
VENV_PY="$REPO/.venv/bin/python"
"$VENV_PY" -m pip install -q --upgrade pip >&2
"$VENV_PY" -m pip install -q -e "$REPO${VALORA_EXTRAS:+[$VALORA_EXTRAS]}" >&2
