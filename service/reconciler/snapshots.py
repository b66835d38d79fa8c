"""Snapshots: taken of the running server where the storage copies one instant, else
with a short, clean stop of the server; and dropped once deleted.

A snapshot is taken under its database's claim, so nothing else touches that
server while its data is copied.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import psycopg

from ..domain.models import (
    DELETING_OR_DELETED,
    SNAPSHOT_SOURCES,
    Database,
    Snapshot,
    SnapshotStatus,
    Status,
    utcnow,
)
from ..domain.records import SERVICE
from ..errors import DbprovError, InsufficientStorage, PermanentError, TransientError
from ..postgres.admin import admin_login
from .provision import Provisioning
from .steps import Context, Step

if TYPE_CHECKING:
    from ..domain.templates import Templates

log = logging.getLogger(__name__)

# What changes or removes a database's data: held back while a snapshot of
# it, asked for first, is pending.
AFTER_SNAPSHOTS = frozenset({Status.RESETTING, Status.DELETING})


class Snapshots(Step):
    """The steps of a pending or deleting snapshot."""

    def __init__(self, ctx: Context, provisioning: Provisioning, templates: Templates | None) -> None:
        super().__init__(ctx)
        self._server_admin = ctx.server_admin
        self._provisioning = provisioning
        self._templates = templates

    def take(self, snapshot_id: str, database_id: str) -> None:
        """A copy of the running server's data of one instant, after a checkpoint
        (so that its first start has little to recover); else a clean stop, a
        copy, and the server started again."""
        with self.store.read() as session:
            snapshot = session.get(Snapshot, snapshot_id)
        record = self._load(database_id)
        if snapshot is None or snapshot.status != SnapshotStatus.PENDING:
            return
        # A reset or a delete asked for after the snapshot waits for it (see
        # run_once): the data is still as it was, and needs no restart after.
        after = record.status in AFTER_SNAPSHOTS
        # A sleeping one's data is copied as it lies: no wake.
        if record.status not in SNAPSHOT_SOURCES and not after:
            if record.status in DELETING_OR_DELETED | {Status.FAILED}:
                self._settle(snapshot, error=f"its database is {record.status.value}")
            return  # stopping or starting: the next pass tries again
        started = time.monotonic()
        running = record.status == Status.READY
        live = False
        try:
            live = running and not after and self.runtime.copies_live(database_id)
            if live:
                self._checkpoint(record)
            elif running or after or record.status == Status.SLEEPING:
                # A clean shutdown ends with a checkpoint: the copy needs no
                # recovery. A sleeping one's is stopped already, unless its
                # stop failed on the way to sleep.
                self.runtime.stop_server(database_id)
            size = self.runtime.copy_data(database_id, snapshot_id, record.image)
        except InsufficientStorage as exc:
            self._settle(snapshot, error=exc.detail)
            return
        except TransientError as exc:
            log.warning("snapshot %s: postponed: %s", snapshot_id, exc.detail)
            return
        except PermanentError as exc:
            self._settle(snapshot, error=exc.detail)
            return
        finally:
            if running and not live:
                self._restart(record)
        seconds = round(time.monotonic() - started, 3)
        self._settle(snapshot, size=size)
        with self.store.transaction() as session:
            self.records.event(session, record, "snapshot-taken", SERVICE,
                               {"snapshot": snapshot_id, "bytes": size, "seconds": seconds})
        log.info("snapshot %s of database %s: %d bytes in %.2f s", snapshot_id, database_id, size, seconds)

    def _checkpoint(self, record: Database) -> None:
        try:
            self._server_admin.checkpoint(admin_login(record, self.vault))
        except psycopg.Error as exc:
            # The copy is as consistent without it, only slower to start.
            log.info("database %s: no checkpoint before its snapshot: %s", record.id, exc)

    def _restart(self, record: Database) -> None:
        try:
            self.runtime.start_server(record.id)
            self._provisioning.wait_ready(record, admin_login(record, self.vault))
        except DbprovError as exc:
            # Drift repair starts it again on a later pass.
            log.warning("database %s: not back after its snapshot yet: %s", record.id, exc.detail)

    def _settle(self, snapshot: Snapshot, size: int | None = None, error: str | None = None) -> None:
        with self.store.transaction() as session:
            self.records.compare_and_set(
                session, Snapshot, snapshot.id, {SnapshotStatus.PENDING},
                status=SnapshotStatus.FAILED if error else SnapshotStatus.READY,
                size_bytes=size, last_error=error, ready_at=None if error else utcnow(),
            )
            if snapshot.template_id is not None and self._templates is not None:
                self._templates.settle(session, snapshot.template_id, snapshot_ready=error is None)
        if error:
            log.warning("snapshot %s failed: %s", snapshot.id, error)

    def drop(self, snapshot_id: str, _key: str) -> None:
        self.runtime.remove_server(snapshot_id)
        with self.store.transaction() as session:
            self.records.compare_and_set(
                session, Snapshot, snapshot_id, {SnapshotStatus.DELETING},
                status=SnapshotStatus.DELETED, deleted_at=utcnow(),
            )
        log.info("snapshot %s deleted", snapshot_id)
