#!/usr/bin/env bash
# Set up (once) and run the main job: serve the embedded default model, OpenAI-compatible, on
# http://127.0.0.1:8000 (README shows a curl and an openai client example). Extra arguments go
# to `valora serve`.
set -euo pipefail
VALORA_EXTRAS=server source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec "$REPO/.venv/bin/valora" serve --host 127.0.0.1 --port 8000 "$@"
