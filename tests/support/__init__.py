"""Helpers the tests share: ``services`` (fixtures that start real Redis, PostgreSQL, Celery workers and the
control plane; loaded as a plugin by tests/conftest.py), ``embed`` (one trained and exported bundle per
session, real images), ``compose_parse`` (the Dockerfile / compose reader behind tests/deploy), ``browser``
(Debian's Chromium through Playwright for the dashboard tests)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
