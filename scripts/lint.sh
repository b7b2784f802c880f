#!/usr/bin/env bash
# Lint and type-check with the venv's pinned tools (configured in pyproject.toml: [tool.ruff], [tool.mypy]).
# scripts/test.sh runs this before pytest, so CI fails on a new finding. Checks only: it never reformats.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/mypy
