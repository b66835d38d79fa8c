"""tenants, tokens, rate windows; encrypted passwords and a service-kept superuser

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Existing databases move to the tenant "default". Their containers were made
with the tenant user as superuser, so that user is also recorded as the
service's admin user; their passwords are encrypted with the vault that
``Store.upgrade`` hands in.
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("database_limit", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenants")),
    )
    op.bulk_insert(
        tenants,
        [{"name": "default", "database_limit": None, "created_at": datetime.now(timezone.utc)}],
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name=op.f("fk_tokens_tenant_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokens")),
    )
    op.create_index(op.f("ix_tokens_tenant"), "tokens", ["tenant"])
    op.create_table(
        "rate_windows",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("window", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "window", name=op.f("pk_rate_windows")),
    )

    op.drop_index("uq_databases_live_name", table_name="databases")
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("tenant", sa.String(length=63), nullable=True))
        batch.add_column(sa.Column("superuser", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("admin_username", sa.String(length=63), nullable=True))
        batch.add_column(sa.Column("admin_password", sa.String(length=255), nullable=True))

    databases = sa.table(
        "databases",
        sa.column("id", sa.String), sa.column("username", sa.String),
        sa.column("password", sa.String), sa.column("tenant", sa.String),
        sa.column("superuser", sa.Boolean), sa.column("admin_username", sa.String),
        sa.column("admin_password", sa.String),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(databases.c.id, databases.c.username, databases.c.password)).all()
    vault = context.config.attributes.get("vault")
    if rows and vault is None:
        raise RuntimeError("existing databases need the vault to encrypt their passwords")
    for row in rows:
        secret = vault.encrypt(row.password)
        connection.execute(
            databases.update().where(databases.c.id == row.id).values(
                tenant="default", superuser=True, admin_username=row.username,
                password=secret, admin_password=secret,
            )
        )

    with op.batch_alter_table("databases") as batch:
        batch.alter_column("tenant", existing_type=sa.String(length=63), nullable=False)
        batch.alter_column("superuser", existing_type=sa.Boolean(), nullable=False)
        batch.alter_column("admin_username", existing_type=sa.String(length=63), nullable=False)
        batch.alter_column("admin_password", existing_type=sa.String(length=255), nullable=False)
        batch.create_foreign_key(op.f("fk_databases_tenant_tenants"), "tenants", ["tenant"], ["name"])
        batch.create_index(op.f("ix_databases_tenant"), ["tenant"])
    op.create_index(
        "uq_databases_tenant_live_name",
        "databases",
        ["tenant", "name"],
        unique=True,
        sqlite_where=sa.text("status != 'deleted'"),
        postgresql_where=sa.text("status != 'deleted'"),
    )


def downgrade() -> None:
    vault = context.config.attributes.get("vault")
    databases = sa.table("databases", sa.column("id", sa.String), sa.column("password", sa.String))
    connection = op.get_bind()
    rows = connection.execute(sa.select(databases.c.id, databases.c.password)).all()
    if rows and vault is None:
        raise RuntimeError("existing databases need the vault to decrypt their passwords")
    for row in rows:
        connection.execute(
            databases.update().where(databases.c.id == row.id)
            .values(password=vault.decrypt(row.password))
        )
    op.drop_index("uq_databases_tenant_live_name", table_name="databases")
    with op.batch_alter_table("databases") as batch:
        batch.drop_index(op.f("ix_databases_tenant"))
        batch.drop_constraint(op.f("fk_databases_tenant_tenants"), type_="foreignkey")
        batch.drop_column("admin_password")
        batch.drop_column("admin_username")
        batch.drop_column("superuser")
        batch.drop_column("tenant")
    op.create_index(
        "uq_databases_live_name",
        "databases",
        ["name"],
        unique=True,
        sqlite_where=sa.text("status != 'deleted'"),
        postgresql_where=sa.text("status != 'deleted'"),
    )
    op.drop_table("rate_windows")
    op.drop_index(op.f("ix_tokens_tenant"), table_name="tokens")
    op.drop_table("tokens")
    op.drop_table("tenants")
