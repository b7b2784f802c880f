"""jobs.effective_config and jobs.recipe: what a job runs, beside what was submitted (issue 27 item 1)

A job submitted without a preset is fitted at train time (excb/training/recipe.py) and a budget sets its step count, so
the submitted config (``jobs.config``) is not what runs. The worker copies the run's ``config.yaml`` (after the
recipe and the budget) into ``effective_config`` and a summary of ``recipe.json`` (the reasons, the data
profile, the step count the budget chose) into ``recipe`` as soon as the trainer writes them. Both stay NULL
until then (and for rows written before this revision).

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("effective_config", sa.JSON))
        batch.add_column(sa.Column("recipe", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("recipe")
        batch.drop_column("effective_config")
