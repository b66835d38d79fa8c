"""databases: one record per requested PostgreSQL server

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = ("pending", "provisioning", "ready", "failed", "deleting", "deleted")


def upgrade() -> None:
    op.create_table(
        "databases",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=True),
        sa.Column(
            "status",
            sa.Enum(*STATUSES, name="database_status", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("version", sa.String(length=8), nullable=False),
        sa.Column("image", sa.String(length=255), nullable=False),
        sa.Column("host_port", sa.Integer(), nullable=True),
        sa.Column("database_name", sa.String(length=63), nullable=False),
        sa.Column("username", sa.String(length=63), nullable=False),
        sa.Column("password", sa.String(length=255), nullable=False),
        sa.Column("container_id", sa.String(length=80), nullable=True),
        sa.Column("volume_name", sa.String(length=255), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("phase_timings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_databases")),
        sa.UniqueConstraint("host_port", name=op.f("uq_databases_host_port")),
    )
    op.create_index(op.f("ix_databases_status"), "databases", ["status"])
    op.create_index(
        "uq_databases_live_name",
        "databases",
        ["name"],
        unique=True,
        sqlite_where=sa.text("status != 'deleted'"),
        postgresql_where=sa.text("status != 'deleted'"),
    )


def downgrade() -> None:
    op.drop_index("uq_databases_live_name", table_name="databases")
    op.drop_index(op.f("ix_databases_status"), table_name="databases")
    op.drop_table("databases")
