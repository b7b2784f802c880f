"""Shared pytest configuration. Heavy service fixtures (databases, Redis, Celery workers, the control plane)
live in support/services.py and are loaded as a plugin so test modules can simply request them."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every successful job indexes its training images (services/index) in a child that takes seconds of CPU; only the
# tests about the index need that, so the others' jobs skip it.
# tests/services/dashboard/test_dashboard_browser.py's stack drops all EXCB_* variables and so runs with the
# default (on); test_index_api.py sets IndexSettings explicitly.
os.environ.setdefault("EXCB_INDEX__AFTER_JOB", "false")

pytest_plugins = ["support.services"]

# Fixtures that start real Redis / PostgreSQL / Celery processes: a test that requests one is an integration test,
# so `-m "not integration"` needs no service running (db_url's sqlite half stays in).
_INTEGRATION_FIXTURES = frozenset({"pg_url", "redis_url", "private_redis", "make_stack"})


def pytest_collection_modifyitems(items: list) -> None:
    import pytest

    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if _INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or params.get("db_url") == "postgresql":
            item.add_marker(pytest.mark.integration)
