#!/usr/bin/env bash
# Rewrite constraints.txt from the tested venv (after scripts/setup.sh): every installed package at its exact
# version, minus excb itself and tools installed by hand. pyproject.toml keeps the ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  cat <<'HEAD'
# Exact versions of the tested environment: scripts/setup.sh (the venv, CI) and the images install with them
# (pip install -c constraints.txt); pyproject.toml declares ranges. torch/torchvision are the pair on this
# project's machines' disk (a CUDA build on PyPI for Linux x86_64); the CPU images install the same release
# from PyTorch's CPU index and skip the torch, torchvision, nvidia-* and triton lines (docker/Dockerfile.slim).
# Regenerate: scripts/setup.sh, then scripts/freeze-constraints.sh.
HEAD
  .venv/bin/pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
    | grep -v -E '^(-e |excb[= @]|py-spy==|usearch==)'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
