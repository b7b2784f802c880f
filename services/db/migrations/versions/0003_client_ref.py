"""client job ids scoped per owner: jobs.client_ref = "<owner>:<job_id>" (unique)

Rows written before keep working under their old id: their id was the client's id (or a server id), so it is
copied into client_ref under the row's owner.

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("client_ref", sa.String(255)))
    op.execute("UPDATE jobs SET client_ref = COALESCE(owner, '') || ':' || id")
    op.create_index("uq_jobs_client_ref", "jobs", ["client_ref"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_jobs_client_ref", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("client_ref")
