#!/usr/bin/env bash
# Set up (once) and run the CPU test suite. Extra arguments go to pytest.
set -euo pipefail
VALORA_EXTRAS=test source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$REPO"
JAX_PLATFORMS=cpu exec "$VENV_PY" -m pytest "$@"
