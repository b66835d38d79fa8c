"""TLS: the certificate authority that signs every server's certificate, and
whether a database's server has one

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

Servers made before have no certificate (``tls`` false) until their
container is made anew; their connection URIs do not ask for TLS until then.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "certificate_authorities",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("certificate", sa.Text(), nullable=False),
        sa.Column("private_key", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_certificate_authorities")),
    )
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("tls", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.drop_column("tls")
    op.drop_table("certificate_authorities")
