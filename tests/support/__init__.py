"""Helpers the tests share: ``services`` (fixtures that start real Redis, PostgreSQL, Celery workers and the
control plane; loaded as a plugin by tests/conftest.py), ``embed`` (one trained and exported bundle per
session, real images), ``compose_parse`` (the Dockerfile / compose reader behind tests/deploy), ``browser``
(Debian's Chromium through Playwright for the dashboard tests)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# A timeout in a test is a hang guard, never a speed limit: several times the slowest run seen (CI once failed on
# a busy machine at a benchmark smoke test's 120 s subprocess timeout). What a test asserts is what ran; how fast
# is the benchmarks' business. pytest-timeout's 900 s per test (pyproject.toml) stays the outer guard.
HANG_GUARD_S = 600
