#!/usr/bin/env bash
# Set up (once) and run the main job on the embedded default model: answer a question
# about an example image. Extra arguments go to `valora generate`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec "$REPO/.venv/bin/valora" generate --image "$REPO/examples/shapes.png" \
    --prompt "How many shapes are in the picture?" "$@"
