#!/usr/bin/env bash
# The GPU suite (issue 16): correctness, training throughput, data path and serving on one GPU, in <= 8 minutes,
# with nothing from the network. Runs the project from the working tree (PYTHONPATH=.); installs wheels carried in
# benchmarks/wheels/ (see benchmarks/gpu_wheels.sh) into a temporary target first. Every stage runs under
# `timeout`, and the whole suite under a time budget, so one slow stage cannot eat the rest.
#
#   bash benchmarks/gpu_suite.sh                       # on a GPU machine: full stages (a CPU-only machine gets --check)
#   bash benchmarks/gpu_suite.sh --check               # tiny shapes, every stage's code path, no timings (CI)
#   bash benchmarks/gpu_suite.sh --stages train,data   # rerun only some stages
#
# Writes $OUT/suite.md (the table for benchmarks/RESULTS.md), $OUT/suite.json, $OUT/suite.log and $OUT/logs.tar.gz
# (at most the 8 files the device tool brings back); $OUT defaults to runs/gpu_suite. Exit 1 if a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CHECK=0
STAGES="env,correctness,train_r50,train_vits,data_gpu,data_cpu_loaders,serving,service"
BUDGET=${GPU_SUITE_BUDGET_S:-470}
while [ $# -gt 0 ]; do
  case "$1" in
    --check) CHECK=1 ;;
    --stages) STAGES="env,$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-$ROOT/runs/gpu_suite}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/excb-gpu-suite.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-$(command -v python3 || command -v python)}
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
LOG="$OUT/suite.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

# -- carried wheels (pydantic, pydantic-settings, fastapi, celery, ...) into a private target, then the project's
#    own metadata there too, so `excb up` finds the services' CLI entry point while the code comes from PYTHONPATH=.
if ls "$ROOT"/benchmarks/wheels/*.whl >/dev/null 2>&1; then
  SITE="$WORK/site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "$ROOT"/benchmarks/wheels/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$SITE"
    say "installed $(ls "$ROOT"/benchmarks/wheels/*.whl | wc -l) carried wheels into $SITE"
  else
    say "warning: installing the carried wheels failed (see suite.log)"
  fi
fi
if ! "$PY" -c "import importlib.metadata as m; assert any(e.name == 'services' for e in m.entry_points(group='excb.cli'))" 2>/dev/null; then
  META="$WORK/meta"
  if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --target "$META" "$ROOT" >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$META"   # after the working tree: only the entry-point metadata is used
    say "installed the project's metadata (CLI entry points) into $META"
  else
    say "warning: could not install the project's metadata; 'excb up' will be missing"
  fi
fi

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA" != 1 ] && [ "$CHECK" = 0 ]; then
  say "no CUDA device: running in --check mode (tiny shapes, code paths only, no timings)"
  CHECK=1
fi
MODE=$([ "$CHECK" = 1 ] && echo check || echo gpu)
DEV=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)
THREADS=$(nproc)

# stage NAME LIMIT_S [--junit F] [--result F] -- COMMAND...: run under timeout (capped by the budget left), record it.
stage() {
  local name=$1 limit=$2; shift 2
  local extra=()
  while [ "$1" != "--" ]; do extra+=("$1" "$2"); shift 2; done
  shift
  case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    "$PY" benchmarks/gpu_suite.py record --work "$WORK" --stage "$name" --rc 77 --seconds 0 --limit "$limit" \
      --mode "$MODE" --why "suite budget of ${BUDGET} s spent" | tee -a "$LOG"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name (limit ${limit} s)"
  echo "\$ $*" >"$WORK/$name.cmd"
  local t0 rc ms
  t0=$(date +%s%N)
  { cat "$WORK/$name.cmd"; timeout --kill-after=10 "$limit" "$@"; } >"$WORK/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  tail -n 25 "$WORK/$name.log" >>"$LOG"
  "$PY" benchmarks/gpu_suite.py record --work "$WORK" --stage "$name" --rc "$rc" --limit "$limit" --mode "$MODE" \
    --seconds "$((ms / 1000)).$(printf %03d $((ms % 1000)))" --log "$WORK/$name.log" "${extra[@]}" | tee -a "$LOG"
}

# a stage that needs something this machine lacks is recorded as a skip (exit 77) with the reason
needs_modules() {
  "$PY" -c "import importlib.util as u, sys; m=[n for n in sys.argv[1:] if u.find_spec(n) is None]; \
print('skipped: missing ' + ', '.join(m)) if m else None; sys.exit(77 if m else 0)" "$@"
}

stage env 60 -- "$PY" benchmarks/gpu_suite.py env --work "$WORK"

stage correctness 150 --junit "$WORK/cuda.xml" -- \
  "$PY" -m pytest -m cuda tests/excb/test_cuda.py -q -rs -p no:cacheprovider --junitxml "$WORK/cuda.xml"

if [ "$CHECK" = 1 ]; then
  TRAIN=(--device "$DEV" --quick --batch 4 --set model.num_clusters=64 --set augment.num_local_crops=2 --threads 1)
  stage train_r50 120 --result "$WORK/train_r50.json" -- \
    "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --presets resnet50-ep400 --json-out "$WORK/train_r50.json"
  stage train_vits 120 --result "$WORK/train_vits.json" -- \
    "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --presets vit-s16-ep800 --no-memory --json-out "$WORK/train_vits.json"
  stage data_gpu 120 --result "$WORK/data_gpu.json" -- \
    "$PY" benchmarks/data_throughput.py --device "$DEV" --quick --threads 1 --json-out "$WORK/data_gpu.json"
  stage data_cpu_loaders 120 --result "$WORK/data_cpu_loaders.json" -- \
    "$PY" benchmarks/data_throughput.py --device "$DEV" --quick --threads 1 --set data.gpu_augment=off \
      --set data.num_workers=2 --json-out "$WORK/data_cpu_loaders.json"
  stage serving 120 --result "$WORK/serving.json" -- \
    "$PY" benchmarks/serving_gpu.py --device "$DEV" --check --threads 1 --json-out "$WORK/serving.json"
  stage service 150 --result "$WORK/service.md" -- bash -c \
    "$(declare -f needs_modules); PY=$PY; needs_modules fastapi uvicorn httpx pydantic_settings orjson || exit 77; \
     $PY benchmarks/embed_load.py --width 8 --size 32 --clusters 64 --threads 1 --max-batch 4 --levels 1,4 \
       --rounds 1 --seconds 0.3 | tee $WORK/service.md"
else
  # ResNet-50 / ViT-S/16 at batch 64 and 128, 2x224 + 6x96 crops, K = 65536, bf16 vs the naive fp16 reference step
  TRAIN=(--device cuda --batch 64,128 --warmup 3 --blocks 2 --steps 6 --probe-timeout 60)
  stage train_r50 110 --result "$WORK/train_r50.json" -- \
    "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --presets resnet50-ep400 --json-out "$WORK/train_r50.json"
  stage train_vits 110 --result "$WORK/train_vits.json" -- \
    "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --presets vit-s16-ep800 --json-out "$WORK/train_vits.json"
  # real 500x375 q90 JPEGs -> shards -> nvJPEG + device multi-crop -> the R50 b128 step, vs synthetic tensors
  stage data_gpu 70 --result "$WORK/data_gpu.json" -- \
    "$PY" benchmarks/data_throughput.py --device cuda --images 384 --rounds 2 --steps 4 --decode-batch 128 \
      --json-out "$WORK/data_gpu.json"
  # the same step fed by the CPU path: PIL decode + torchvision multi-crop in 16 DataLoader workers
  stage data_cpu_loaders 45 --result "$WORK/data_cpu_loaders.json" -- \
    "$PY" benchmarks/data_throughput.py --device cuda --images 256 --rounds 1 --steps 4 --decode-batch 128 \
      --set data.gpu_augment=off --set "data.num_workers=$THREADS" --json-out "$WORK/data_cpu_loaders.json"
  # the exported R50 bundle: torch CUDA bf16 at batch 1/64/256 vs ORT (CPU build) on all cores
  stage serving 75 --result "$WORK/serving.json" -- \
    "$PY" benchmarks/serving_gpu.py --device cuda --threads "$THREADS" --rounds 2 --seconds 1.5 \
      --bundle-dir "$WORK/r50" --json-out "$WORK/serving.json"
  # the embed service (ORT CPU) on that bundle at concurrency 1/8/32, micro-batching on vs off
  stage service 60 --result "$WORK/service.md" -- bash -c \
    "$(declare -f needs_modules); PY=$PY; needs_modules fastapi uvicorn httpx pydantic_settings orjson || exit 77; \
     test -f $WORK/r50/bundle/model.json || { echo 'skipped: no bundle from the serving stage'; exit 77; }; \
     $PY benchmarks/embed_load.py --bundle $WORK/r50/bundle --threads $THREADS --max-batch 32 --levels 1,8,32 \
       --rounds 1 --seconds 3 | tee $WORK/service.md"
fi

tar -czf "$OUT/logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log *.xml *.json *.md 2>/dev/null) 2>/dev/null
CMD="bash benchmarks/gpu_suite.sh$([ "$CHECK" = 1 ] && echo ' --check')"
"$PY" benchmarks/gpu_suite.py report --work "$WORK" --out "$OUT" --command "$CMD" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "total $(( $(date +%s) - START )) s"
exit "$rc"
