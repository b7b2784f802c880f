"""Model-store operations (the ``models`` table: one row per registered bundle), shared by the worker that
registers a bundle, the API's model routes and the index view. Jobs are ``services/db/jobs.py``'s."""

from __future__ import annotations

from sqlalchemy import select

from services.db.session import Database
from services.db.tables import ModelRow


def add_model(db: Database, row: ModelRow) -> None:
    """Register a bundle. Which model is active is not stored here: ``<models_dir>/active.json`` alone says it
    (services/common/active_model.py), written after this row by the worker and by the activate route."""
    with db.session() as s:
        s.add(row)


def list_models(db: Database, owner: str | None) -> list[ModelRow]:
    """Newest first; ``owner``: that key's rows only (None: every row)."""
    q = select(ModelRow).order_by(ModelRow.created_at.desc())
    if owner is not None:
        q = q.where(ModelRow.owner == owner)
    with db.session() as s:
        return list(s.scalars(q))


def get_model(db: Database, model_id: str) -> ModelRow | None:
    """The row, whoever owns it (callers check ownership), or None."""
    with db.session() as s:
        return s.get(ModelRow, model_id)
