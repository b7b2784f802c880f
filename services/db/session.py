"""Engines, sessions and lock-safe migrations for the job store.

SQLite (default, under ``Settings.home``) runs in WAL mode with a busy timeout so the API, the reaper and a
worker process can share it. Migrations run at startup of every process that opens the store; they are
serialised by ``pg_advisory_lock`` on PostgreSQL and by an ``flock`` next to the file on SQLite, so replicas
starting together never race on ``alembic_version``.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Any, Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x6578636201  # "excb\x01": one advisory-lock id for schema migrations


def default_url(home: Path) -> str:
    """The embedded default: ``sqlite:///HOME/excb.sqlite``."""
    return f"sqlite:///{(Path(home).resolve() / 'excb.sqlite')}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine with the right settings for the dialect (PostgreSQL URLs default to psycopg 3)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=10)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Any]:
    """Yield a connection holding the dialect's cross-process migration lock."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    lock_path = Path(f"{database}.migrate.lock") if database and database != ":memory:" else None
    handle = open(lock_path, "a+") if lock_path else None
    try:
        if handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
        with engine.connect() as conn:
            yield conn
    finally:
        if handle:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to head (idempotent; safe when several processes start at once)."""
    cfg = alembic_config()
    with _migration_lock(engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()


class Database:
    """An engine plus a session factory; one per process."""

    def __init__(self, url: str, run_migrations: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if run_migrations:
            migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success, rolled back on error."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
