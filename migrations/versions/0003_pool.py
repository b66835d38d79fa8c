"""the warm pool's tenant

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Warm pool members are records of the reserved tenant "_pool" (a name no
token can be made for), so they hold ports and containers like any database
while no tenant sees them.
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

tenants = sa.table(
    "tenants",
    sa.column("name", sa.String),
    sa.column("database_limit", sa.Integer),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    op.bulk_insert(
        tenants,
        [{"name": "_pool", "database_limit": None, "created_at": datetime.now(timezone.utc)}],
    )


def downgrade() -> None:
    # Pool members that are still alive would lose their tenant: refuse.
    op.execute(sa.text("DELETE FROM databases WHERE tenant = '_pool' AND status = 'deleted'"))
    op.execute(sa.text("DELETE FROM tenants WHERE name = '_pool'"))
