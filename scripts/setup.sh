#!/usr/bin/env bash
# Create .venv and install excb with the services and test extras (idempotent).
# torch/torchvision are pinned (pyproject.toml); on this project's machines pip takes them from local files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e '.[services,test]'
echo "excb installed in $(pwd)/.venv — activate with: source .venv/bin/activate"
