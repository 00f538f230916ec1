#!/usr/bin/env bash
# Everything that only a GPU can check (issue 13), in one run of < 8 minutes on one H100/H200:
#
#   step        what                                                              expected
#   preflight   nvidia-smi facts (name, driver, memory), torch sees CUDA             ~5 s
#   parity      compiled Triton kernels vs the PyTorch reference, fp32 + bf16,    ~60-120 s
#               forward + all gradients (tests/kernels/test_block_parity_gpu.py,
#               4 pytest processes so Triton compiles in parallel)
#   bench       benchmarks/kernels.py: fused vs eager vs torch.compile, %HBM,     ~90-150 s
#               PASS/MISS against the targets (a MISS is reported, not a failure)
#   quickstart  bash scripts/quickstart.sh --set train.device=cuda; asserts CUDA  ~120-180 s
#               and bf16 from its STACKREC_RESULT / DeepSpeed checkpoints
#   smoke-data  stackrec prepare of configs/smoke.yaml (synthetic)                 ~10 s
#   zero2       1 Ray worker, DeepSpeed ZeRO-2, configs/smoke.yaml, on cuda/bf16   ~30-45 s
#   zero3       the same with ZeRO-3                                               ~30-45 s
#   doc         the "GPU check" section of docs/benchmarks.md (always written)     ~1 s
#
# Every step runs under a timeout with its own log; a failed step is reported with its log's tail,
# the remaining steps still run (one GPU session should find every problem at once), and the
# script exits 1 at the end if any step failed. Logs: runs/gpu_check/<UTC time>/.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine (needs network for setup/MovieLens
#                                             # unless .venv and ~/.cache/stackrec are already there)
#   bash scripts/gpu_check.sh --cpu-dry-run   # CI / no GPU: argument parsing, Triton parity in the
#                                             # interpreter at the smallest shapes, the docs code path
#                                             # with fake figures into a temp copy of the doc
#
# Env: GPU_CHECK_DRY_RUN=1 (= --cpu-dry-run), GPU_CHECK_DIR (log root, default runs/gpu_check),
# GPU_CHECK_DOC (doc to write, default docs/benchmarks.md; a temp copy in a dry run),
# PYTHON / STACKREC (default: the .venv's), GPU_CHECK_SKIP (space-separated step names to skip),
# GPU_CHECK_NO_SETUP=1 (an existing environment, no network: no scripts/setup_env.sh, and the
# quickstart step runs `$STACKREC quickstart`, what scripts/quickstart.sh runs after its setup).
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT="$PWD/scripts/gpu_check.sh"

usage() {
  sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//'
}

DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
STEP_FN=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY_RUN=1 ;;
    --step) STEP_FN="${2:?--step needs a name}"; shift 2; break ;;  # internal: one step in its own process
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DRY_RUN" in
  0 | 1) ;;
  *) echo "gpu_check: GPU_CHECK_DRY_RUN must be 0 or 1 (got $DRY_RUN)" >&2; exit 2 ;;
esac

if [ -z "$STEP_FN" ]; then
  STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  RUN="${GPU_CHECK_DIR:-runs/gpu_check}/$(date -u +%Y%m%dT%H%M%SZ)"
  mkdir -p "$RUN"
  RUN="$(cd "$RUN" && pwd)"
  : > "$RUN/steps.tsv"
  exec > >(tee -a "$RUN/gpu_check.log") 2>&1
  TEE_PID=$!
  # At exit, let tee write the last lines before the script's status is seen.
  trap 'exec >&- 2>&-; wait "$TEE_PID" 2> /dev/null || true' EXIT
  if [ "$DRY_RUN" = 0 ] && [ "${GPU_CHECK_NO_SETUP:-0}" != 1 ] && [ -z "${PYTHON:-}" ] \
    && [ ! -x .venv/bin/python ]; then
    echo "gpu_check: no .venv yet: bash scripts/setup_env.sh"
    bash scripts/setup_env.sh
  fi
else
  RUN="${GPU_CHECK_RUN:?--step is internal: run scripts/gpu_check.sh without it}"
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${STACKREC:-}" ]; then
  if [ -x .venv/bin/stackrec ]; then STACKREC=.venv/bin/stackrec; else STACKREC="$PYTHON -m stackrec_dist.cli"; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON STACKREC GPU_CHECK_RUN="$RUN" GPU_CHECK_DRY_RUN="$DRY_RUN"
read -r -a STACKREC_CMD <<< "$STACKREC"
HELPER=("$PYTHON" benchmarks/gpu_check.py)
SELF=(bash "$SCRIPT" --step)  # a step that is a function below runs in its own process, under `timeout`

FAILED=()
T0=$SECONDS

# step NAME LIMIT_S CMD...: run CMD under a timeout into $RUN/NAME.log; record status and seconds.
step() {
  local name="$1" limit="$2"
  shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    printf '%s\tskipped\t0\tGPU_CHECK_SKIP\n' "$name" >> "$RUN/steps.tsv"
    echo "gpu_check: [$name] skipped (GPU_CHECK_SKIP)"
    return 0
  fi
  echo "gpu_check: [$name] $* (limit ${limit} s, at +$((SECONDS - T0)) s)"
  local start=$SECONDS rc=0
  timeout --kill-after=20 "$limit" "$@" > "$RUN/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - start)) note=""
  if [ "$rc" -eq 0 ]; then
    printf '%s\tok\t%s\t\n' "$name" "$took" >> "$RUN/steps.tsv"
    echo "gpu_check: [$name] ok in ${took} s"
    return 0
  fi
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note="timed out after ${limit} s"; else note="exit $rc"; fi
  printf '%s\tFAILED\t%s\t%s, log %s\n' "$name" "$took" "$note" "$RUN/$name.log" >> "$RUN/steps.tsv"
  FAILED+=("$name")
  echo "gpu_check: [$name] FAILED ($note) in ${took} s; last lines of $RUN/$name.log:" >&2
  tail -n 40 "$RUN/$name.log" >&2
  return 1
}

# skip NAME WHY: record a step that was not run.
skip() {
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$RUN/steps.tsv"
  echo "gpu_check: [$1] skipped: $2"
}

# --- preflight: device facts -----------------------------------------------------------------
preflight() {
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,compute_cap --format=csv,noheader,nounits \
    > "$RUN/nvidia-smi.csv"
  "${HELPER[@]}" facts "$RUN/nvidia-smi.csv" "$RUN/facts.json"
  "$PYTHON" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch.cuda.is_available():', ok); \
sys.exit(0 if ok else 'torch does not see the GPU (a CPU build of torch?)')"
}

# --- parity: 4 pytest processes, so that Triton compiles in parallel ------------------------------
PARITY_TEST=tests/kernels/test_block_parity_gpu.py
PARITY_SPLITS=("fp32 and not C256 and not C512 or padding" "fp32 and (C256 or C512)"
  "bf16 and not C256 and not C512" "bf16 and (C256 or C512)")
parity_gpu() {
  local pids=() logs=() i=0
  for expr in "${PARITY_SPLITS[@]}"; do
    logs+=("$RUN/parity-$i.log")
    "$PYTHON" -m pytest "$PARITY_TEST" -m gpu -k "$expr" -q -p no:cacheprovider -rfEs > "$RUN/parity-$i.log" 2>&1 &
    pids+=("$!")
    i=$((i + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid" || true; done  # the summary below judges every split
  cat "${logs[@]}"
  "${HELPER[@]}" parity-summary "$RUN/parity.txt" "${logs[@]}"
}

# Dry run: the same kernels in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton
# is imported: a fresh process), at the smallest shapes of the CPU suite.
parity_dry() {
  local t=tests/kernels/test_block_parity.py
  TRITON_INTERPRET=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
    "$t::test_triton_fp32_matches_reference[2-7-24-1-pads0-True-True]" \
    "$t::test_triton_bf16_within_eager_bf16_error[3-7-24-1-pads1]" > "$RUN/parity-0.log" 2>&1 || true
  cat "$RUN/parity-0.log"
  "$PYTHON" -m pytest "$PARITY_TEST" --collect-only -q -p no:cacheprovider > "$RUN/parity-collect.log" 2>&1
  tail -n 1 "$RUN/parity-collect.log"
  "${HELPER[@]}" parity-summary "$RUN/parity.txt" "$RUN/parity-0.log"
}

# torch.compile is timed at the B=1024 shapes only: a compile costs ~10-20 s and dynamo may still
# recompile per shape even with dynamic shapes, so all 12 could take minutes of the budget.
BENCH_COMPILE_SHAPES="1024x50x64,1024x50x256,1024x50x512,1024x200x64,1024x200x256,1024x200x512"

# --- training runs: sample GPU memory while they run, then assert cuda + bf16 ----------------------
# checked_run NAME RUN_DIR CMD...: run CMD, then gpu_check.py check-run on its log and RUN_DIR.
checked_run() {
  local name="$1" run_dir="$2" sampler="" rc=0
  shift 2
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -l 1 \
      > "$RUN/$name-gpu-mem.csv" 2> /dev/null &
    sampler=$!
  fi
  "$@" || rc=$?
  if [ -n "$sampler" ]; then kill "$sampler" 2> /dev/null || true; wait "$sampler" 2> /dev/null || true; fi
  if [ -s "$RUN/$name-gpu-mem.csv" ]; then
    echo "gpu_check: peak GPU memory of compute processes during $name (MiB):" \
      "$(cut -d, -f2 "$RUN/$name-gpu-mem.csv" | sort -n | tail -n 1)"
  fi
  [ "$rc" -eq 0 ] || return "$rc"
  "${HELPER[@]}" check-run "$RUN/$name.log" "$run_dir" "$RUN/$name.json"
}

quickstart() {
  local cmd=(bash scripts/quickstart.sh)
  if [ "${GPU_CHECK_NO_SETUP:-0}" = 1 ]; then cmd=("${STACKREC_CMD[@]}" quickstart); fi
  rm -rf "$RUN/quickstart"
  checked_run quickstart "$RUN/quickstart" "${cmd[@]}" --set train.device=cuda \
    --set "train.checkpoint_dir=$RUN/quickstart" --set "distributed.storage_path=$RUN/quickstart/ray"
}

zero_run() {
  local stage="$1"
  rm -rf "$RUN/zero$stage"
  checked_run "zero$stage" "$RUN/zero$stage" "${STACKREC_CMD[@]}" train --config configs/smoke.yaml \
    --set "data.path=$RUN/smoke-data" --set train.device=cuda \
    --set distributed.num_workers=1 --set "distributed.zero_stage=$stage" \
    --set "train.checkpoint_dir=$RUN/zero$stage" --set "distributed.storage_path=$RUN/zero$stage/ray"
}

if [ -n "$STEP_FN" ]; then
  case "$STEP_FN" in
    preflight | parity_gpu | parity_dry | quickstart | zero_run) "$STEP_FN" "$@"; exit $? ;;
    *) echo "gpu_check: unknown step $STEP_FN" >&2; exit 2 ;;
  esac
fi

if [ "$DRY_RUN" = 1 ]; then
  DOC="${GPU_CHECK_DOC:-$RUN/benchmarks.md}"
  if [ ! -e "$DOC" ]; then cp docs/benchmarks.md "$DOC"; fi
else
  DOC="${GPU_CHECK_DOC:-docs/benchmarks.md}"
fi
printf '{"started": "%s", "dry_run": %s, "log_dir": "%s"}\n' "$STARTED" \
  "$([ "$DRY_RUN" = 1 ] && echo true || echo false)" "$RUN" > "$RUN/facts.json"
echo "gpu_check: $([ "$DRY_RUN" = 1 ] && echo 'CPU dry run' || echo 'GPU run'), logs in $RUN, doc $DOC, python $PYTHON"
if [ "$DRY_RUN" = 1 ]; then
  step parity 300 "${SELF[@]}" parity_dry || true
  step bench-args 120 "$PYTHON" benchmarks/kernels.py --help || true
  for name in preflight bench quickstart smoke-data zero2 zero3; do skip "$name" "dry run (needs a GPU)"; done
  "${HELPER[@]}" fake "$RUN"
else
  if step preflight 60 "${SELF[@]}" preflight; then
    step parity 300 "${SELF[@]}" parity_gpu || true
    step bench 300 "$PYTHON" benchmarks/kernels.py --reps 20 --warmup 5 --json "$RUN/kernels.json" \
      --compile dynamic --compile-shapes "$BENCH_COMPILE_SHAPES" || true
    step quickstart 360 "${SELF[@]}" quickstart || true
    if step smoke-data 120 "${STACKREC_CMD[@]}" prepare --config configs/smoke.yaml \
      --set prepare.source=synthetic --set "prepare.output=$RUN/smoke-data"; then
      step zero2 200 "${SELF[@]}" zero_run 2 || true
      step zero3 200 "${SELF[@]}" zero_run 3 || true
    else
      skip zero2 "no smoke data"
      skip zero3 "no smoke data"
    fi
  else
    for name in parity bench quickstart smoke-data zero2 zero3; do skip "$name" "preflight failed"; done
  fi
fi
step doc 60 "${HELPER[@]}" write-doc "$RUN" "$DOC" || true

TOTAL=$((SECONDS - T0))
echo
echo "gpu_check: summary (total ${TOTAL} s; budget 480 s)"
column -t -s $'\t' "$RUN/steps.tsv" 2> /dev/null || cat "$RUN/steps.tsv"
if [ "$TOTAL" -gt 480 ]; then echo "gpu_check: WARNING: took ${TOTAL} s, over the 8-minute budget"; fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${FAILED[*]} (logs in $RUN)" >&2
  exit 1
fi
echo "gpu_check: OK (logs in $RUN, figures in $DOC)"
