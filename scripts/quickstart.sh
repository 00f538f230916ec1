#!/usr/bin/env bash
# The main job end to end on embedded defaults: environment, MovieLens-100K, train, grow, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/stackrec quickstart "$@"
