"""Whether a database's server syncs its writes to disk

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

Every database before this one is durable, as every server was.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("durable", sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    # Their servers go on without syncing until they are made anew.
    with op.batch_alter_table("databases") as batch:
        batch.drop_column("durable")
