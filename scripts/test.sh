#!/usr/bin/env bash
# Set up everything and run the whole test suite (unit, integration with real Redis/PostgreSQL/Celery,
# browser tests with Debian's Chromium), after the linter and type checker (scripts/lint.sh). Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-deps.sh
scripts/setup.sh
scripts/services-up.sh
scripts/lint.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
