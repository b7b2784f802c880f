"""Job store: SQLAlchemy 2 models, engine/session helpers and Alembic migrations (SQLite or PostgreSQL)."""
