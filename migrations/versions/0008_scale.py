"""the list filtered by status in index order, and the provisioning phase
histogram kept as counts instead of read from every record at each scrape

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# As service.models has them today; a migration stands alone.
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
PHASES = ("copy", "server", "ready", "setup", "claim", "total")


def upgrade() -> None:
    op.create_index(
        "ix_databases_tenant_status_created_at", "databases", ["tenant", "status", "created_at", "id"]
    )
    op.create_index("ix_databases_status_created_at", "databases", ["status", "created_at", "id"])
    histogram = op.create_table(
        "phase_histogram",
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("phase", "bucket", name=op.f("pk_phase_histogram")),
    )
    # The counts so far, from the records that have them.
    counts = {(phase, b): [0, 0.0] for phase in PHASES for b in range(len(PHASE_BUCKETS) + 1)}
    rows = op.get_bind().execute(
        sa.text("SELECT phase_timings FROM databases WHERE ready_at IS NOT NULL")
    )
    for (timings,) in rows:
        if isinstance(timings, str):
            timings = json.loads(timings)
        for phase, seconds in (timings or {}).items():
            if phase not in PHASES:
                continue
            first = next((i for i, bound in enumerate(PHASE_BUCKETS) if seconds <= bound), len(PHASE_BUCKETS))
            for b in range(first, len(PHASE_BUCKETS) + 1):
                counts[(phase, b)][0] += 1
                counts[(phase, b)][1] += seconds
    op.bulk_insert(histogram, [
        {"phase": phase, "bucket": b, "count": count, "seconds": seconds}
        for (phase, b), (count, seconds) in counts.items()
    ])


def downgrade() -> None:
    op.drop_table("phase_histogram")
    op.drop_index("ix_databases_status_created_at", table_name="databases")
    op.drop_index("ix_databases_tenant_status_created_at", table_name="databases")
