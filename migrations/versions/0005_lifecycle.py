"""a database's life between create and delete: expiry, protection, plans,
settings and extensions, idle tracking, events and idempotency keys

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

The statuses stopping, stopped and starting need no change: the status column
is a string without a check constraint.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("protected", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("plan", sa.String(63), nullable=False, server_default="default"))
        batch.add_column(sa.Column("parameters", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("extensions", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("active_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_databases_expires_at", ["expires_at"])
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("plans", sa.JSON(), nullable=True))
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("database_id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_database_id", "events", ["database_id"])
    op.create_index("ix_events_tenant", "events", ["tenant"])
    op.create_index("ix_events_at", "events", ["at"])
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("database_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("events")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("plans")
    with op.batch_alter_table("databases") as batch:
        batch.drop_index("ix_databases_expires_at")
        for column in ("active_at", "extensions", "parameters", "plan", "protected", "expires_at"):
            batch.drop_column(column)
