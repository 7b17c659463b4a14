#!/usr/bin/env bash
# Set up (once) and run the CPU test suite. Extra arguments go to pytest.
set -euo pipefail
VALORA_EXTRAS=test source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$REPO"
# The suite compiles thousands of small programs and runs each a few times: XLA's CPU backend without
# LLVM's optimisation passes compiles them about a third faster (only the programs' speed changes).
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0" JAX_PLATFORMS=cpu exec "$VENV_PY" -m pytest "$@"
