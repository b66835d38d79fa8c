"""Snapshots of a database's data, and what is made from them: resets here,
clones through ``Databases.create``, templates in ``templates``.

A snapshot is taken by the reconciler. On a storage pool it is a snapshot of
the running server's data, of one instant; otherwise the server is shut down
cleanly (a checkpoint, so the copy needs no recovery), its data copied, and
the server started again. It is a copy of its own, so it outlives its
database until it is deleted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection

import sqlalchemy.exc
from sqlalchemy import select

from ..errors import Conflict, NotFound, PortRangeExhausted
from ..runtime.protocol import ServerRuntime
from ..settings import Settings
from ..storage.pool import check_room
from ..store.engine import Store
from .models import SNAPSHOT_SOURCES, Database, Snapshot, SnapshotStatus, Status
from .ports import pick_port
from .records import Records
from .registry import Registry
from .tenancy import Principal

log = logging.getLogger(__name__)

SNAPSHOT_ID_PATTERN = r"[0-9a-f]{12}"


class Snapshots:
    def __init__(
        self, settings: Settings, store: Store, records: Records, registry: Registry, runtime: ServerRuntime
    ) -> None:
        self.settings = settings
        self.store = store
        self.records = records
        self.registry = registry
        self.runtime = runtime

    def take(self, principal: Principal, database_id: str) -> Snapshot:
        """Ask for a snapshot of a ready (or stopped) database; the reconciler takes it."""
        record = self.ready_for_snapshot(principal, database_id)
        self.check_room(f"a snapshot of {database_id}")
        with self.store.transaction() as session:
            snapshot = self.registry.add_snapshot(
                session, record, principal.actor, quota=self.settings.snapshot_quota
            )
        log.info("snapshot %s of database %s requested", snapshot.id, record.id)
        return snapshot

    def ready_for_snapshot(self, principal: Principal, database_id: str) -> Database:
        """The principal's database, if a snapshot of it can be taken now."""
        record = self.registry.get(principal, database_id)
        if record.status not in SNAPSHOT_SOURCES:
            raise Conflict(f"database {database_id} is {record.status.value}; "
                           "a snapshot needs it ready, stopped or sleeping")
        return record

    def check_room(self, what: str) -> None:
        """Refuse what copies data (507) while the storage pool has less room than
        DBPROV_STORAGE_MIN_FREE: a full pool fails its running servers' writes."""
        report = self.runtime.storage_report()
        if report.free_bytes is not None:
            check_room(report.pool, report.free_bytes, self.settings.storage_min_free, what)

    def get(self, principal: Principal, snapshot_id: str, usable: bool = False) -> Snapshot:
        """A snapshot the principal may see; with ``usable``, one that is ready."""
        # Anything but an id cannot exist; odd bytes stay away from the store's driver.
        if not re.fullmatch(SNAPSHOT_ID_PATTERN, snapshot_id):
            raise NotFound(f"no snapshot with id {snapshot_id!r}")
        with self.store.read() as session:
            snapshot = session.get(Snapshot, snapshot_id)
        if (
            snapshot is None
            or not (principal.admin or snapshot.tenant == principal.tenant)
            or snapshot.status == SnapshotStatus.DELETED
        ):
            raise NotFound(f"no snapshot with id {snapshot_id!r}")
        if usable and snapshot.status != SnapshotStatus.READY:
            raise Conflict(f"snapshot {snapshot_id} is {snapshot.status.value}, not ready")
        return snapshot

    def list(self, principal: Principal) -> list[Snapshot]:
        query = select(Snapshot).where(
            Snapshot.status != SnapshotStatus.DELETED, Snapshot.template_id.is_(None)
        )
        if not principal.admin:
            query = query.where(Snapshot.tenant == principal.tenant)
        with self.store.read() as session:
            return list(session.scalars(query.order_by(Snapshot.created_at.desc(), Snapshot.id)))

    def delete(self, principal: Principal, snapshot_id: str) -> Snapshot:
        snapshot = self.get(principal, snapshot_id)
        if snapshot.template_id is not None:
            raise Conflict(f"snapshot {snapshot_id} belongs to a template; delete the template instead")
        return self.transition(
            snapshot_id, {SnapshotStatus.PENDING, SnapshotStatus.READY, SnapshotStatus.FAILED},
            status=SnapshotStatus.DELETING,
        ) or self.get(principal, snapshot_id)

    def transition(
        self, snapshot_id: str, expected: Collection[SnapshotStatus], **values
    ) -> Snapshot | None:
        """Compare-and-set on a snapshot's status, announced like a record's change."""
        with self.store.transaction() as session:
            return self.records.compare_and_set(session, Snapshot, snapshot_id, expected, **values)

    def wait_until_settled(self, principal: Principal, snapshot_id: str, timeout: float) -> Snapshot:
        """The snapshot once it is ready or failed, or as it is when ``timeout`` runs out."""
        return self.records.wait(
            lambda: self.get(principal, snapshot_id), lambda s: s.status == SnapshotStatus.PENDING, timeout
        )

    def reset(self, principal: Principal, database_id: str, snapshot_id: str | None) -> Database:
        """Put a database back to ``snapshot_id``, or to the snapshot it was made from.

        Its URI and password stay; its connections are dropped.
        """
        record = self.registry.get(principal, database_id)
        snapshot_id = snapshot_id or record.source_snapshot_id
        if snapshot_id is None:
            raise Conflict(f"database {database_id} was not made from a snapshot; name one to reset to")
        snapshot = self.get(principal, snapshot_id, usable=True)
        self.check_room(f"a reset of {database_id}")
        if snapshot.tenant != record.tenant:
            # An admin sees every tenant's snapshots; a database takes only its own tenant's data.
            raise NotFound(f"tenant {record.tenant!r} has no snapshot with id {snapshot_id!r}")
        if snapshot.version != record.version:
            raise Conflict(
                f"snapshot {snapshot_id} is of version {snapshot.version}; database {database_id} "
                f"runs {record.version}"
            )
        values = dict(
            actor=principal.actor, event="resetting", details={"snapshot": snapshot.id}, status=Status.RESETTING,
            source_snapshot_id=snapshot.id, seeded_at=None, last_error=None,
            # The server's superuser is the one inside the snapshot's data.
            admin_username=snapshot.admin_username, admin_password=snapshot.admin_password,
        )
        if record.status == Status.LOST:
            # Its port went with its data: one picked anew, as for a create.
            try:
                with self.store.transaction() as session:
                    changed = self.records.transition(
                        database_id, {Status.LOST}, session=session,
                        host_port=pick_port(session, self.settings.port_range), **values,
                    )
            except sqlalchemy.exc.IntegrityError:
                raise PortRangeExhausted("another create took the port picked; try again") from None
        else:
            changed = self.records.transition(database_id, SNAPSHOT_SOURCES, **values)
        if changed is None:
            current = self.registry.get(principal, database_id)
            raise Conflict(
                f"database {database_id} is {current.status.value}; "
                "only a ready, stopped, sleeping or lost one can be reset"
            )
        log.info("database %s: reset to snapshot %s requested", database_id, snapshot.id)
        return changed

    def mark_unused(self, session, snapshot_ids: Collection[str]) -> None:
        """Inside a transaction: have these snapshots removed."""
        self.records.compare_and_set_all(
            session, Snapshot, Snapshot.id.in_(list(snapshot_ids)), set(SnapshotStatus) - {SnapshotStatus.DELETED},
            status=SnapshotStatus.DELETING,
        )
