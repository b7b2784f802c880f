#!/usr/bin/env bash
# Create .venv and install excb with the services and test extras (idempotent).
# Exact versions come from constraints.txt (pyproject.toml declares ranges); on this project's machines pip takes
# torch/torchvision from local files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt torch torchvision
# cpu: ONNX Runtime's CPU wheel (a GPU machine may use gpu instead); digits, parquet: what the tests use
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[services,test,cpu,digits,parquet]'
echo "excb installed in $(pwd)/.venv — activate with: source .venv/bin/activate"
