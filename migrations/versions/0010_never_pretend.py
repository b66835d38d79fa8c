"""Rate limits as a bucket per token: what a token may still do at once,
instead of a count per minute; snapshots owned by the clone made from them;
a rotation's new password kept until it is the password

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

The per-minute counts are not carried over: each token starts with a full
bucket. Snapshots that clones made before took from_database stay counted
and kept as before: which clone they went with was not recorded.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.add_column(sa.Column("owner_id", sa.String(32), nullable=True))
    op.create_index("ix_snapshots_owner_id", "snapshots", ["owner_id"])
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("pending_password", sa.String(255), nullable=True))
        batch.add_column(sa.Column("pending_since", sa.DateTime(timezone=True), nullable=True))
    op.drop_table("rate_windows")
    op.create_table(
        "rate_buckets",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("due", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_buckets")),
    )


def downgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.drop_column("pending_since")
        batch.drop_column("pending_password")
    op.drop_index("ix_snapshots_owner_id", table_name="snapshots")
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("owner_id")
    op.drop_table("rate_buckets")
    op.create_table(
        "rate_windows",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("window", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "window", name=op.f("pk_rate_windows")),
    )
