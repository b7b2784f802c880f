"""The worker process's one job store: what the job task and the consumer heartbeat both write through."""

from __future__ import annotations

from functools import lru_cache

from services.db.session import Database, default_url
from services.settings import get_settings


@lru_cache(maxsize=1)
def database() -> Database:
    """One engine per worker process (migrations run once, under the cross-process lock)."""
    settings = get_settings()
    return Database(settings.database_url or default_url(settings.home))
