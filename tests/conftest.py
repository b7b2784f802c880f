"""Shared pytest configuration. Heavy service fixtures (databases, Redis, Celery workers, the control plane)
live in fixtures_services.py and are loaded as a plugin so test modules can simply request them."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["fixtures_services"]
