"""initial job store: jobs, job_attempts, job_metrics, models

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("owner", sa.String(64)),
        sa.Column("name", sa.String(255)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("run_dir", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("lease_token", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("heartbeat_at", TS),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("enqueued_at", TS),
        sa.Column("publish_count", sa.Integer, nullable=False),
        sa.Column("progress", sa.JSON, nullable=False),
        sa.Column("latest_metrics", sa.JSON, nullable=False),
        sa.Column("balance", sa.JSON, nullable=False),
        sa.Column("cluster_sizes", sa.JSON),
        sa.Column("artifacts", sa.JSON, nullable=False),
        sa.Column("model_id", sa.String(64)),
        sa.Column("error", sa.JSON),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_owner", "jobs", ["owner"])
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("lease_token", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("outcome", sa.String(32)),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_job_attempts_job_id", "job_attempts", ["job_id"])
    op.create_table(
        "job_metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.UniqueConstraint("job_id", "step", name="uq_job_metrics_step"),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(64)),
        sa.Column("owner", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("bundle_dir", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("model_json", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_models_job_id", "models", ["job_id"])


def downgrade() -> None:
    op.drop_table("models")
    op.drop_table("job_metrics")
    op.drop_table("job_attempts")
    op.drop_table("jobs")
