"""Upkeep of databases that are up or going: stop, expiry, the idle stop, deletion, and rotations left unfinished."""

from __future__ import annotations

import logging
import time
from datetime import datetime

import psycopg

from ..domain.models import (
    DELETING_OR_DELETED,
    NOT_DELETED,
    Database,
    Snapshot,
    SnapshotStatus,
    Status,
    utcnow,
)
from ..domain.tenancy import POOL_TENANT
from ..postgres.admin import Login, admin_login
from .steps import Context, Step, Superseded

log = logging.getLogger(__name__)


class Upkeep(Step):
    """The steps of a stopping, expired, idle or deleting database."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._server_admin = ctx.server_admin
        # When each ready database's clients were last counted, for the idle
        # stop, and how many sessions it had had then.
        self._idle_checked: dict[str, float] = {}
        self._sessions: dict[str, int] = {}

    def stop(self, database_id: str) -> None:
        # A sleeping one's server is stopped already; its port stops being held.
        self._give_back_port(database_id)
        self.runtime.stop_server(database_id)
        self._transition(
            database_id, {Status.STOPPING}, status=Status.STOPPED, attempts=0, next_attempt_at=None,
            retrying_since=None, last_error=None,
        )
        self._idle_checked.pop(database_id, None)
        self._sessions.pop(database_id, None)
        log.info("database %s: stopped", database_id)

    @staticmethod
    def expired(record: Database, now: datetime) -> bool:
        return (
            record.expires_at is not None
            and record.expires_at <= now
            and record.status not in DELETING_OR_DELETED
            and not record.protected
            and record.tenant != POOL_TENANT
        )

    def expire(self, record: Database) -> Database | None:
        """Delete an expired database the way a DELETE does; None if it moved on."""
        expired = self.records.transition(
            record.id, NOT_DELETED - DELETING_OR_DELETED, only_if=Database.protected.is_(False), status=Status.DELETING,
            event="expired", details={"expires_at": record.expires_at.isoformat()},
        )
        if expired is not None:
            log.info("database %s: expired at %s; deleting it", record.id, record.expires_at.isoformat())
        return expired

    def idle_due(self, record: Database) -> bool:
        """Whether a ready database's clients are to be counted now (``check_idle``)."""
        idle_stop = record.idle_stop
        # An unavailable one has no clients to count, nor a server to stop.
        if idle_stop is None or record.tenant == POOL_TENANT or record.status != Status.READY:
            return False
        # A quarter of the idle time between counts (at most a minute) keeps
        # a stop within 25 % of its time without a connection per pass.
        if time.monotonic() - self._idle_checked.get(record.id, 0.0) < min(idle_stop / 4, 60.0):
            return False
        self._idle_checked[record.id] = time.monotonic()
        return True

    def check_idle(self, database_id: str) -> None:
        """Count the tenant's connections; a database idle for its ``idle_stop`` sleeps.

        Where the service cannot hold its port (a Swarm), it is stopped instead.
        """
        record = self._load(database_id)
        if record.status != Status.READY or record.idle_stop is None:
            return
        admin = admin_login(record, self.vault)
        if self._in_use(database_id, admin):
            return
        now = utcnow()
        idle_since = record.active_at or record.ready_at or now
        if (now - idle_since).total_seconds() < record.idle_stop:
            return
        # A client that connects while the server shuts down is refused, so
        # the shutdown is made short (what it would write, written now while
        # clients are still served) and the last count comes right before it.
        try:
            self._server_admin.checkpoint(admin)
        except psycopg.Error as exc:
            # Only shortens the shutdown. Only the class: a server message might echo the statement.
            log.info("database %s: no checkpoint before it sleeps (%s)", database_id, type(exc).__name__)
        if self._in_use(database_id, admin):
            return
        details = {"idle_since": idle_since.isoformat()}
        if self.sleepers is None:
            stopping = self.records.transition(
                database_id, {Status.READY}, status=Status.STOPPING, event="idle-stopped", details=details,
            )
            if stopping is not None:
                log.info("database %s: no clients since %s; stopping it", database_id, idle_since.isoformat())
                self.stop(database_id)
            return
        # Said to sleep only once its port is held: a client that reads
        # "sleeping" and connects wakes it. One that connects while the server
        # shuts down is told so by the server (57P03), and one after its exit
        # is closed by the engine's proxy until the engine lets go of the
        # port, which is held from that moment (``hold``'s ``stop``).
        counted = time.monotonic()
        asked: list[bool] = []

        def asleep() -> bool:
            asked.append(True)
            return self.records.transition(
                database_id, {Status.READY}, status=Status.SLEEPING, event="slept", details=details,
            ) is not None

        if self.sleepers.hold(database_id, self.settings.bind_address, record.host_port, asleep,
                              stop=lambda: self.runtime.stop_server(database_id)):
            # The stop and the hold: a client in it was told of the shutdown
            # or closed by the engine's proxy, until the port was held.
            log.info("database %s: no clients since %s; it sleeps (stopped and held in %.2f s)",
                     database_id, idle_since.isoformat(), time.monotonic() - counted)
        elif not asked and asleep():
            # The port cannot be had: stopped, it slept for a moment and
            # wakes at once, as one whose port is lost does. (Asked and
            # refused: the record moved on, to a stop or a delete, whose step
            # has the server.)
            self.records.transition(database_id, {Status.SLEEPING}, status=Status.WAKING)

    def _in_use(self, database_id: str, admin: Login) -> bool:
        """Whether the server has a client, or had one since the last count (it
        was active now, then); or cannot be asked, and so stays as it is."""
        try:
            clients, sessions = self._server_admin.client_activity(admin)
        except psycopg.Error:
            return True  # down: drift repair deals with it, and the next count decides
        # A client that came and went since the last count was a client too
        # (a job that connects once a minute); after a restart, the first
        # count only learns where the counter stands.
        came_and_went = self._sessions.get(database_id, sessions) != sessions
        self._sessions[database_id] = sessions
        if clients or came_and_went:
            self.records.transition(database_id, {Status.READY}, active_at=utcnow())
            return True
        return False

    def sleep(self, database_id: str) -> None:
        """A sleeping database's server stopped and its port held, again after a restart."""
        record = self._load(database_id)
        if record.status != Status.SLEEPING or self.sleepers is None:
            return
        self.runtime.stop_server(database_id)
        if not self.sleepers.hold(database_id, self.settings.bind_address, record.host_port):
            # Asleep with nobody listening, nothing would ever wake it: awake it stays.
            self.records.transition(database_id, {Status.SLEEPING}, status=Status.WAKING)

    def teardown(self, database_id: str) -> None:
        self._give_back_port(database_id)
        self.runtime.remove_server(database_id)
        with self.store.transaction() as session:
            deleted = self.records.transition(
                database_id,
                {Status.DELETING},
                session=session,
                status=Status.DELETED,
                deleted_at=utcnow(),
                host_port=None,
                attempts=0,
                next_attempt_at=None,
                retrying_since=None,
            )
            if deleted is None:
                raise Superseded(database_id)
            # The snapshot it was cloned from_database goes with it, in the
            # same transaction: a crash between the two would keep it for good.
            self.records.compare_and_set_all(
                session, Snapshot, Snapshot.owner_id == database_id,
                {SnapshotStatus.PENDING, SnapshotStatus.READY, SnapshotStatus.FAILED},
                status=SnapshotStatus.DELETING,
            )
        log.info("database %s: deleted", database_id)

    def finish_rotation(self, database_id: str) -> None:
        """A rotation whose process ended before it was done: its password set
        on the server (again: it may or may not have been) and made the password."""
        record = self._load(database_id)
        if record.pending_password is None or record.status != Status.READY:
            return
        try:
            self._server_admin.set_password(
                admin_login(record, self.vault), record.username, self.vault.decrypt(record.pending_password)
            )
        except psycopg.Error as exc:
            # Only the class: a server message might echo the statement.
            log.warning("database %s: rotation not finished yet (%s)", database_id, type(exc).__name__)
            return
        if self.records.finish_rotation(database_id, record.pending_password) is not None:
            log.info("database %s: a rotation left unfinished is done", database_id)
