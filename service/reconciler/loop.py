"""The reconciler: the one component that changes database servers.

It compares the metadata store with what the runtime runs and closes the gap:
provisions what is pending, removes what is being deleted, repairs drift and
sweeps orphans. Every step is idempotent, so a crash anywhere is finished or
cleaned up by the next pass.

Here is the loop: a thread that plans each pass (``run_once``) and a pool of
workers that run the steps, each under its database's claim. The steps are
in ``provision``, ``snapshots``, ``upkeep`` and ``drift``; what their
failures mean is in ``steps``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from ..domain.models import (
    COMING_UP,
    DELETING_OR_DELETED,
    MEANT_TO_RUN,
    NOT_DELETED,
    SNAPSHOT_LIVE,
    Database,
    Snapshot,
    SnapshotStatus,
    Status,
    utcnow,
)
from ..domain.pool import WarmPool
from ..domain.records import Records
from ..errors import TransientError
from ..postgres.admin import ServerAdmin
from ..postgres.tls import Authority
from ..postgres.wire import refuse
from ..runtime.protocol import RUNNING, ServerInfo, ServerRuntime, ServerSpec
from ..settings import Settings
from ..store.coordination import Claims
from ..store.crypto import Vault
from ..store.engine import Store
from .drift import Drift
from .provision import Provisioning
from .snapshots import AFTER_SNAPSHOTS, Snapshots
from .steps import Context, Outcomes, Task
from .upkeep import Upkeep
from .wake import Sleepers, relay

if TYPE_CHECKING:
    from ..domain.templates import Templates

log = logging.getLogger(__name__)

# How often old events and idempotency keys are dropped.
_PURGE_INTERVAL = 60.0

# The columns a pass reads of each live record.
_PASS_COLUMNS = (
    Database.id, Database.status, Database.tenant, Database.protected, Database.expires_at,
    Database.next_attempt_at, Database.server_host, Database.ready_at.is_not(None).label("was_ready"),
    Database.pending_since, Database.idle_stop,
)
# Longer than any rotation takes (a connection, a lock and a statement timeout
# in the tenant's server): a password still pending after it was left by a
# process that ended, and the reconciler finishes the rotation.
_ROTATION_GRACE = timedelta(seconds=60)


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: ServerRuntime,
        records: Records,
        vault: Vault,
        server_admin: ServerAdmin,
        claims: Claims,
        authority: Authority,
        heartbeat: Path | None = None,
        pool: WarmPool | None = None,
        templates: Templates | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.records = records
        self._claims = claims
        # Touched after every complete pass, for `dbprov worker --check`.
        self._heartbeat = heartbeat
        self._pool = pool
        self._stopping = threading.Event()
        self._sleepers = Sleepers(self._connected) if runtime.publishes_here else None
        # Databases a wake thread serves now.
        self._waking: set[str] = set()
        self._wakes = threading.BoundedSemaphore(settings.max_parallel_provisioning)
        ctx = Context(settings, store, runtime, records, vault, server_admin, self._stopping, self._sleepers)
        self._provisioning = Provisioning(ctx, authority)
        self._snapshots = Snapshots(ctx, self._provisioning, templates)
        self._upkeep = Upkeep(ctx)
        self._drift = Drift(ctx, self._provisioning)
        # What the reconciler does for a record in each status that asks for work.
        self._tasks: dict[Status, Task] = {
            Status.PENDING: self._provisioning.provision,
            Status.PROVISIONING: self._provisioning.provision,
            Status.STARTING: self._provisioning.resume,
            Status.WAKING: self._provisioning.resume,
            Status.RESETTING: self._provisioning.resume,
            Status.STOPPING: self._upkeep.stop,
            Status.DELETING: self._upkeep.teardown,
        }
        self._outcomes = Outcomes(ctx, worked=self._tasks)
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_parallel_provisioning, thread_name_prefix="dbprov-task"
        )
        self._inflight: dict[str, Future] = {}
        self._deferred: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # The earliest postponed attempt, so the loop wakes for it.
        self._next_due: datetime | None = None
        # The outage last reported, so that a long one is logged once, not every pass.
        self._outage: str | None = None
        self._purged_at = 0.0
        # When the engine was last read for drift and orphans.
        self._full_at = 0.0

    # -- the loop ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dbprov-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; unfinished work is resumed by the next start."""
        self._stopping.set()
        self.records.wanted.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._sleepers is not None:
            # The next reconciler holds the ports again on its first pass.
            self._sleepers.close()

    def _loop(self) -> None:
        wanted = self.records.wanted
        while not self._stopping.is_set():
            seen = wanted.generation
            # A write wakes the loop for the work it asks for; the engine is
            # read for drift and orphans once an interval (at thousands of
            # containers that read is most of a pass, and creates in a row
            # would otherwise pay it for each write), and for a postponed
            # attempt, since an unavailable database's next try is drift
            # repair's.
            due = self._next_due is not None and self._next_due <= utcnow()
            full = due or time.monotonic() - self._full_at >= self.settings.reconcile_interval
            try:
                self.run_once(full=full)
                if self._heartbeat is not None:
                    self._heartbeat.touch()
            except TransientError as exc:
                self._report_outage(f"reconcile pass skipped: {exc.detail}")
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad pass
                log.exception("reconcile pass failed")
            wanted.wait(self._idle_time(), since=seen)

    def _idle_time(self) -> float:
        interval = self.settings.reconcile_interval
        # The next whole pass comes an interval after the last, however many
        # passes writes asked for meanwhile.
        wait = interval - (time.monotonic() - self._full_at)
        if self._next_due is not None:
            wait = min(wait, (self._next_due - utcnow()).total_seconds())
        return max(0.05, min(interval, wait))

    def _report_outage(self, text: str | None) -> None:
        if text == self._outage:
            return
        if text is not None:
            log.warning("%s", text)
        else:
            log.info("reconcile passes resumed")
        self._outage = text

    def run_once(self, wait: bool = False, full: bool = True) -> None:
        """One pass over every live record; and, if ``full``, over every server
        of this installation, for drift and orphans."""
        if self._pool is not None:
            # Before the records are read, so the new members are provisioned in this pass.
            self._pool.stock()
        # Servers first, records second: a server made after the listing
        # cannot be mistaken for an orphan, since its record predates it.
        servers: dict[str, ServerInfo] | None = None
        if full:
            self._full_at = time.monotonic()
            try:
                servers = {s.database_id: s for s in self.runtime.list_servers()}
                self._report_outage(None)
            except TransientError as exc:
                # Provisioning and deletion still count their attempts; drift and
                # orphans wait for an engine that answers.
                self._report_outage(f"engine unavailable, drift repair and sweep postponed: {exc.detail}")
        with self.store.read() as session:
            # Only what a pass decides on: whole records (their JSON columns
            # above all) would cost most of a pass at 10,000 of them. A task
            # loads the one record it works on.
            records = session.execute(select(*_PASS_COLUMNS).where(Database.status.in_(NOT_DELETED))).all()
            snapshots = list(session.scalars(select(Snapshot).where(Snapshot.status.in_(SNAPSHOT_LIVE))))
        now = utcnow()
        next_due = None
        # A snapshot asked for before a reset or a delete is of the data as
        # it was: those wait for it (it is taken below, under the same claim).
        snapshotting = {s.database_id for s in snapshots if s.status == SnapshotStatus.PENDING}
        for record in records:
            if record.expires_at is not None and record.status not in DELETING_OR_DELETED:
                if record.expires_at > now:
                    next_due = min(next_due or record.expires_at, record.expires_at)
                elif self._upkeep.expired(record, now):
                    record = self._upkeep.expire(record)
                    if record is None:
                        continue
            if record.next_attempt_at is not None and record.next_attempt_at > now:
                next_due = min(next_due or record.next_attempt_at, record.next_attempt_at)
                continue  # postponed after a transient failure
            if record.pending_since is not None and record.pending_since < now - _ROTATION_GRACE:
                if record.status == Status.READY:
                    self._submit(record.id, self._upkeep.finish_rotation)
                    continue
            task = self._tasks.get(record.status)
            if task is not None:
                if record.status in AFTER_SNAPSHOTS and record.id in snapshotting:
                    continue
                self._submit(record.id, task)
            elif record.status in MEANT_TO_RUN and servers is not None:
                info = servers.get(record.id)
                # Most records of a large installation: nothing to do (inlined
                # for them, as a pass over 10,000 records counts each call).
                if not (record.status == Status.READY and info is not None and info.state == RUNNING
                        and record.server_host is not None):
                    repair = self._drift.check(record, info)
                    if repair is not None:
                        self._submit(record.id, repair)
                if record.idle_stop is not None and self._upkeep.idle_due(record):
                    self._submit(record.id, self._upkeep.check_idle)
            elif record.status == Status.SLEEPING and self._sleepers is not None:
                if not self._sleepers.holds(record.id):
                    self._submit(record.id, self._upkeep.sleep)
        self._next_due = next_due
        for snapshot in snapshots:
            if snapshot.status == SnapshotStatus.PENDING:
                # Under its database's claim: nothing else touches that server meanwhile.
                self._submit(snapshot.database_id, functools.partial(self._snapshots.take, snapshot.id))
            elif snapshot.status == SnapshotStatus.DELETING:
                self._submit(snapshot.id, functools.partial(self._snapshots.drop, snapshot.id))
        if servers is not None:
            with self._lock:
                busy = set(self._inflight)
            self._drift.sweep_orphans(records, snapshots, servers, busy)
        self._purge()
        if wait:
            self.wait_idle()

    def _purge(self) -> None:
        if time.monotonic() - self._purged_at < _PURGE_INTERVAL:
            return
        self._purged_at = time.monotonic()
        events, keys = self.records.purge(self.settings.event_retention, self.settings.idempotency_retention)
        if events or keys:
            log.info("dropped %d old events and %d old idempotency keys", events, keys)

    def wait_idle(self) -> None:
        """Block until every task submitted so far has finished."""
        while True:
            with self._lock:
                futures = list(self._inflight.values())
            if not futures:
                return
            for future in futures:
                future.exception()

    def _submit(self, database_id: str, task: Task) -> None:
        with self._lock:
            if database_id in self._inflight:
                # Wanted again while busy (a snapshot asked for as its create
                # finishes): another pass once the current task is done.
                self._deferred.add(database_id)
                return
            if self._stopping.is_set():
                return
            future = self._executor.submit(self._run_task, database_id, task)
            self._inflight[database_id] = future

    def _run_task(self, database_id: str, task: Task) -> None:
        try:
            with self._claims.hold(database_id) as claimed:
                # Unclaimed: another reconciler works on it; a later pass looks again.
                if claimed:
                    self._outcomes.run(database_id, task)
        except TransientError as exc:
            # Not even the attempt could be counted (the store is down): the
            # next pass picks the record up again.
            log.warning("database %s: postponed: %s", database_id, exc.detail)
        except Exception:  # noqa: BLE001 - one database's trouble must not stop the others
            log.exception("database %s: unexpected error", database_id)
        finally:
            with self._lock:
                self._inflight.pop(database_id, None)
                deferred = database_id in self._deferred
                self._deferred.discard(database_id)
            if deferred:
                self.records.wanted.notify()

    # -- waking a sleeping database -----------------------------------------

    def _connected(self, database_id: str) -> None:
        """A connection came for a sleeping database (from the listeners' thread)."""
        with self._lock:
            if database_id in self._waking or self._stopping.is_set():
                return
            self._waking.add(database_id)
        try:
            threading.Thread(target=self._serve_waiting, args=(database_id,), name="dbprov-wake", daemon=True).start()
        except RuntimeError:
            log.exception("database %s: no thread for its wake; the next connection tries again", database_id)
            with self._lock:
                self._waking.discard(database_id)

    def _serve_waiting(self, database_id: str) -> None:
        try:
            while True:
                self._wake(database_id)
                with self._lock:
                    # One that came after the last take and before this: served too.
                    if not self._sleepers.waiting(database_id) or self._stopping.is_set():
                        self._waking.discard(database_id)
                        return
        except Exception:  # noqa: BLE001 - a thread of its own has nobody else to tell
            log.exception("database %s: wake failed", database_id)
            with self._lock:
                self._waking.discard(database_id)
            for client in self._sleepers.take(database_id)[0]:
                client.close()

    def _wake(self, database_id: str) -> None:
        """Start the server, then hand it the connections that waited, or tell them why not."""
        self.records.transition(database_id, {Status.SLEEPING}, status=Status.WAKING)
        # As many starts at once as provisioning may run: a scan of every
        # sleeping port must not start every server together.
        with self._wakes:
            self._run_now(database_id, self._provisioning.resume)
        # Done here, or by someone else's step (a pass's, or a snapshot's) that held the claim.
        record = self.records.wait(
            lambda: self._load(database_id),
            lambda r: r is not None and r.status in COMING_UP and not self._stopping.is_set(),
            self.settings.ready_timeout,
        )
        clients, since = self._sleepers.take(database_id)
        if record is not None and record.status == Status.READY:
            for client in clients:
                relay(client, (record.server_host, record.host_port), f"database {database_id}")
            if since is not None:
                log.info("database %s: woken for %d connection(s) in %.3f s", database_id, len(clients),
                         time.monotonic() - since)
            return
        # Said to a client that has not logged in: the status and dbprov's
        # own first line of why, never the server's log.
        why = f": {record.last_error.splitlines()[0]}" if record is not None and record.last_error else ""
        if record is None:
            reason = "it does not exist"
        elif record.status in COMING_UP:
            reason = f"it is still {record.status.value}; try again"
        elif record.status == Status.SLEEPING:
            # Its wake failed for a passing reason: asleep again, the next connection tries again.
            reason = f"it could not be woken{why}; try again"
        else:
            reason = f"it is {record.status.value}{why}"
        message = f"dbprov: database {database_id} cannot take connections: {reason}"
        for client in clients:
            threading.Thread(target=refuse, args=(client, message), name="dbprov-refuse", daemon=True).start()

    def _load(self, database_id: str) -> Database | None:
        with self.store.read() as session:
            return session.get(Database, database_id)

    def _run_now(self, database_id: str, task: Task) -> None:
        """``task`` run in this thread, unless one runs for the database already."""
        with self._lock:
            if database_id in self._inflight or self._stopping.is_set():
                return
            future: Future = Future()
            self._inflight[database_id] = future
        try:
            self._run_task(database_id, task)
        finally:
            future.set_result(None)

    def _spec(self, record: Database) -> ServerSpec:
        """The server a record gets, as a step makes it."""
        return self._provisioning._spec(record)
