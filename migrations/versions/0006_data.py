"""data: snapshots, templates, and where a database's data comes from; warm
servers replaced by ones stocked with their tenant role

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Warm servers are now stocked with their tenant role made and checked, so
    # that a claim needs no round trip; older members have none: replace them.
    op.execute(sa.text(
        "UPDATE databases SET status = 'deleting' WHERE tenant = '_pool' "
        "AND status IN ('pending', 'provisioning', 'ready')"
    ))
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("source_snapshot_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("seeded_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("template_id", sa.String(32), nullable=True))
        batch.create_index("ix_databases_template_id", ["template_id"])
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("database_id", sa.String(32), nullable=False),
        sa.Column("template_id", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.String(8), nullable=False),
        sa.Column("image", sa.String(255), nullable=False),
        sa.Column("admin_username", sa.String(63), nullable=False),
        sa.Column("admin_password", sa.String(255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name=op.f("fk_snapshots_tenant_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
    )
    op.create_index("ix_snapshots_tenant", "snapshots", ["tenant"])
    op.create_index("ix_snapshots_database_id", "snapshots", ["database_id"])
    op.create_index("ix_snapshots_status", "snapshots", ["status"])
    op.create_table(
        "templates",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("version", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("database_id", sa.String(32), nullable=True),
        sa.Column("snapshot_id", sa.String(32), nullable=True),
        sa.Column("pool_size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name=op.f("fk_templates_tenant_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_templates")),
    )
    op.create_index(
        "uq_templates_tenant_live_key", "templates", ["tenant", "key"], unique=True,
        sqlite_where=sa.text("status != 'deleted'"), postgresql_where=sa.text("status != 'deleted'"),
    )


def downgrade() -> None:
    op.drop_table("templates")
    op.drop_table("snapshots")
    with op.batch_alter_table("databases") as batch:
        batch.drop_index("ix_databases_template_id")
        for column in ("template_id", "seeded_at", "source_snapshot_id"):
            batch.drop_column(column)
