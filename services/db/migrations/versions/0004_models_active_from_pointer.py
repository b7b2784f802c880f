"""models.active goes: which model is active is <models_dir>/active.json alone (services/common/active_model.py)

The column was a second copy of the pointer, kept in step by the worker, the activate route and a sync thread.
Readers now ask the pointer; nothing is lost by dropping the column (the pointer was always written last).

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("active")


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("active", sa.Boolean, nullable=False, server_default=sa.false()))
