"""indexes for the list of databases, newest first

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

With thousands of records, a page of the list is read in index order instead
of sorting every record of the tenant (or of all tenants) first.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_databases_tenant_created_at", "databases", ["tenant", "created_at", "id"])
    op.create_index("ix_databases_created_at", "databases", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_databases_created_at", table_name="databases")
    op.drop_index("ix_databases_tenant_created_at", table_name="databases")
