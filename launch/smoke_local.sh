#!/usr/bin/env bash
# Tiny end-to-end job on this machine: synthetic data -> train NextItNet with 2 blocks -> stack to 4
# blocks -> evaluate. Uses one GPU when nvidia-smi sees one, else the CPU. A few minutes on CPU.
#
#   bash launch/smoke_local.sh                 # outputs under runs/smoke-local/
#   SMOKE_DIR=/tmp/smoke DEVICE=cpu bash launch/smoke_local.sh
#
# Env: SMOKE_DIR (output dir), DEVICE (cpu | cuda, default: auto), STACKREC (the CLI to run),
# CONFIG (default configs/smoke.yaml). Each step's last stdout line is `STACKREC_RESULT {json}`.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/smoke.yaml}"
OUT="${SMOKE_DIR:-runs/smoke-local}"
if [ -z "${STACKREC:-}" ]; then
  if [ -x .venv/bin/stackrec ]; then STACKREC=.venv/bin/stackrec; else STACKREC=stackrec; fi
fi
PYTHON="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi

if [ -z "${DEVICE:-}" ]; then
  if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    DEVICE=cuda
  else
    DEVICE=cpu
  fi
fi
case "$DEVICE" in
  cuda) DEVICE_SETS=(--set train.device=cuda) ;;
  cpu) DEVICE_SETS=(--set train.device=cpu --set train.threads=2) ;;
  *) echo "smoke: DEVICE must be cpu or cuda (got $DEVICE)" >&2; exit 2 ;;
esac

mkdir -p "$OUT/logs"
echo "smoke: device=$DEVICE config=$CONFIG out=$OUT"

# run NAME CMD...: run a step, keep its output in $OUT/logs/NAME.log, fail loudly with its tail.
run() {
  local name="$1"
  shift
  echo "smoke: [$name] $*"
  local start=$SECONDS
  if ! "$@" > "$OUT/logs/$name.log" 2>&1; then
    echo "smoke: [$name] FAILED; last lines of $OUT/logs/$name.log:" >&2
    tail -n 40 "$OUT/logs/$name.log" >&2
    exit 1
  fi
  echo "smoke: [$name] ok in $((SECONDS - start)) s"
}

# result NAME: the JSON of the step's last STACKREC_RESULT line.
result() {
  grep '^STACKREC_RESULT ' "$OUT/logs/$1.log" | tail -n 1 | cut -d' ' -f2-
}

DATA_SETS=(--set "data.path=$OUT/data")

run prepare "$STACKREC" prepare --config "$CONFIG" \
  --set prepare.source=synthetic --set "prepare.output=$OUT/data"

run train-2 "$STACKREC" train --config "$CONFIG" "${DATA_SETS[@]}" "${DEVICE_SETS[@]}" \
  --set model.num_blocks=2 --set "train.checkpoint_dir=$OUT/ckpt-2" --set train.progress=false

run grow-4 "$STACKREC" grow --config "$CONFIG" "${DATA_SETS[@]}" \
  --checkpoint "$OUT/ckpt-2/last" --output "$OUT/ckpt-4"

run evaluate-4 "$STACKREC" evaluate --config "$CONFIG" "${DATA_SETS[@]}" "${DEVICE_SETS[@]}" \
  --checkpoint "$OUT/ckpt-4" --split test

# The grown model must have 4 blocks and produce finite metrics.
GROW_JSON="$(result grow-4)"
EVAL_JSON="$(result evaluate-4)"
"$PYTHON" - "$GROW_JSON" "$EVAL_JSON" <<'PY'
import json, math, sys
grow, metrics = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert grow["blocks"] == 4 and grow["parent_blocks"] == 2, grow
values = {k: v for k, v in metrics.items() if "@" in k}  # mrr@N, hr@N, ndcg@N
assert values and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values.values()), metrics
print("smoke: OK", json.dumps({"blocks": grow["blocks"], **values}, sort_keys=True))
PY
