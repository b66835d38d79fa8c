"""retries kept on the record, where its server answers, no engine ids

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

A transient failure (engine or store unreachable, a port race) is retried with
backoff; the attempt count, the next attempt's time and the start of the
streak live on the record so that they survive a restart. ``server_host`` is
where the service reaches the server, as the runtime reported it; for older
records the reconciler fills it in on its next pass. The container's id and
the volume's name were the Docker engine's business, which the runtime now
keeps to itself: whether a failed database keeps its data follows from
whether it was ever ready.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retrying_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("server_host", sa.String(255), nullable=True))
        batch.drop_column("container_id")
        batch.drop_column("volume_name")


def downgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("volume_name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("container_id", sa.String(80), nullable=True))
        batch.drop_column("server_host")
        batch.drop_column("retrying_since")
        batch.drop_column("next_attempt_at")
        batch.drop_column("attempts")
