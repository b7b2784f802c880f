#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into benchmarks/wheels/ (gitignored), for the device tool's `carry`.
# That machine has no network and its own Python 3.12 (torch, numpy, onnx, onnxruntime CPU, pyyaml, tqdm, httpx,
# scikit-learn, pytest are there; pydantic, pydantic-settings, fastapi, celery, SQLAlchemy are not: KINDS.md).
# Versions are the ones in this checkout's .venv (what the tests here ran with); --no-deps, so every needed
# dependency is named below. gpu_suite.sh installs them with `pip install --no-deps --no-index --target`.
#
#   bash benchmarks/gpu_wheels.sh            # then run the suite with carry=["benchmarks/wheels"]
#
# Not here: onnxruntime-gpu. Its wheel does not fit what the device tool carries: 2026-12-06,
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
# manylinux_2_28_x86_64 onnxruntime-gpu` fetched onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl,
# 255,569,273 bytes (243.7 MiB): about 3.8 times the 64 MiB the whole tree and its carried paths may take, before
# the CUDA/cuDNN libraries it loads at run time. So the suite's ORT figures stay the CPU build's (serving, service).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=benchmarks/wheels
PY=${PYTHON:-.venv/bin/python}
# config + services: pydantic (compiled core), settings, the API, the Celery worker, the job database
PACKAGES=(pydantic pydantic_core annotated-types typing-inspection typing_extensions pydantic-settings python-dotenv
          fastapi opentelemetry-api starlette anyio python-multipart uvicorn
          celery kombu billiard vine amqp click click-didyoumean click-plugins click-repl prompt_toolkit wcwidth tzdata tzlocal
          SQLAlchemy greenlet alembic Mako redis
          sse-starlette httpx-sse watchfiles)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64 any)

version_of() {
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

rm -rf "$DEST"
mkdir -p "$DEST"
specs=()
for name in "${PACKAGES[@]}"; do
  v=$(version_of "$name")
  specs+=("$name${v:+==$v}")
done
args=()
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${args[@]}" \
  -d "$DEST" "${specs[@]}"
ls -1 "$DEST"
echo "total: $(du -sh "$DEST" | cut -f1) in $(ls "$DEST"/*.whl | wc -l) wheels (the device tool carries at most 64 MiB with the tree)"
# what they need that is not in the list (the GPU machine has e.g. click, h11, idna, python-dateutil, six):
for w in "$DEST"/*.whl; do
  unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed "s|^|$(basename "$w" | cut -d- -f1): |"
done | sort -u
