"""Each database's own idle stop, after which it sleeps and wakes on a connection

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

DBPROV_IDLE_STOP applied to every database before: the databases that are
not deleted take its value as the migration runs, so that they go on as they
did. The new statuses (sleeping, waking) fit the status column as it is.
Wakes get a phase of their own in the histogram of phases: its buckets start
empty.
"""

import os

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# As service.domain.models has it today; a migration stands alone.
_BUCKETS = 13  # PHASE_BUCKETS and +Inf


def upgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.add_column(sa.Column("idle_stop", sa.Float(), nullable=True))
    histogram = sa.table(
        "phase_histogram", sa.column("phase", sa.String), sa.column("bucket", sa.Integer),
        sa.column("count", sa.BigInteger), sa.column("seconds", sa.Float),
    )
    op.bulk_insert(histogram, [{"phase": "wake", "bucket": b, "count": 0, "seconds": 0.0} for b in range(_BUCKETS)])
    idle_stop = _idle_stop(os.environ.get("DBPROV_IDLE_STOP", "").strip())
    if idle_stop is not None:
        op.execute(
            sa.text("UPDATE databases SET idle_stop = :seconds WHERE status != 'deleted'").bindparams(
                seconds=idle_stop
            )
        )


def downgrade() -> None:
    op.execute("DELETE FROM phase_histogram WHERE phase = 'wake'")
    # A sleeping database's server is stopped: it is stopped, as far as the old
    # service knows; a waking one's is being started.
    op.execute("UPDATE databases SET status = 'stopped' WHERE status = 'sleeping'")
    op.execute("UPDATE databases SET status = 'starting' WHERE status = 'waking'")
    with op.batch_alter_table("databases") as batch:
        batch.drop_column("idle_stop")


def _idle_stop(text: str) -> float | None:
    """DBPROV_IDLE_STOP as the service reads it (seconds); a value it would refuse is none."""
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if seconds > 0 else None
