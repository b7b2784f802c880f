"""Shared pytest configuration. Heavy service fixtures (databases, Redis, Celery workers, the control plane)
live in fixtures_services.py and are loaded as a plugin so test modules can simply request them."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every successful job indexes its training images (services/index) in a child that takes seconds of CPU; only the
# tests about the index need that, so the others' jobs skip it. tests/test_dashboard_browser.py's stack drops all
# EXCB_* variables and so runs with the default (on); test_index_api.py sets IndexSettings explicitly.
os.environ.setdefault("EXCB_INDEX__AFTER_JOB", "false")

pytest_plugins = ["fixtures_services"]
