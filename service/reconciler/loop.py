"""The reconciler: the one component that changes database servers.

It compares the metadata store with what the runtime runs and closes the gap:
provisions what is pending, removes what is being deleted, repairs drift and
sweeps orphans. Every step is idempotent, so a crash anywhere is finished or
cleaned up by the next pass.

Failures are of two kinds (``errors``): a ``TransientError`` is retried with
exponential backoff and jitter, its attempts kept on the record, until the
retry budget (DBPROV_RETRY_BUDGET) runs out; a ``PermanentError`` fails the
database at once. Either way the reason is in ``last_error``, and nothing is
left behind. Only a bug writes a traceback to the log.

A server whose machine cannot be reached (a Swarm node down) is neither: its
data is there. A ready database on it is ``unavailable`` until the machine is
back, and one being brought up that was ready once waits for it without
spending the budget (``NodeUnavailable``).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psycopg
from sqlalchemy import select, update

from ..domain.models import (
    COMING_UP,
    GOING,
    LIVE,
    OWNS_SERVER,
    RUNS,
    SETTLING,
    SNAPSHOT_LIVE,
    Database,
    Snapshot,
    SnapshotStatus,
    Status,
    utcnow,
)
from ..domain.pool import WarmPool
from ..domain.ports import pick_port
from ..domain.records import SERVICE, Records
from ..domain.tenancy import POOL_TENANT
from ..errors import (
    DataLost,
    DbprovError,
    NodeUnavailable,
    PermanentError,
    PortInUse,
    ServerFailed,
    TransientError,
)
from ..postgres.admin import Login, ServerAdmin, admin_login, set_up_tenant
from ..postgres.tls import Authority
from ..runtime.protocol import ABSENT, RUNNING, UNREACHABLE, ServerInfo, ServerRuntime, ServerSpec
from ..settings import Plan, Settings
from ..store.coordination import Claims
from ..store.crypto import Vault
from ..store.engine import Store

if TYPE_CHECKING:
    from ..domain.templates import Templates

log = logging.getLogger(__name__)

_PORT_RETRIES = 5
_POLL_INTERVAL = 0.01
# Backoff of transient failures: 1 s, 2 s, 4 s ... up to a minute, each with jitter.
_BACKOFF_FIRST = 1.0
_BACKOFF_CAP = 60.0
# How often old events and idempotency keys are dropped.
_PURGE_INTERVAL = 60.0
# What changes or removes a database's data: held back while a snapshot of
# it, asked for first, is pending.
_AFTER_SNAPSHOTS = frozenset({Status.RESETTING, Status.DELETING})


# The columns a pass reads of each live record.
_PASS_COLUMNS = (
    Database.id, Database.status, Database.tenant, Database.protected, Database.expires_at,
    Database.next_attempt_at, Database.server_host, Database.ready_at.is_not(None).label("was_ready"),
    Database.pending_since,
)
# Longer than any rotation takes (a connection, a lock and a statement timeout
# in the tenant's server): a password still pending after it was left by a
# process that ended, and the reconciler finishes the rotation.
_ROTATION_GRACE = timedelta(seconds=60)


class Superseded(Exception):
    """The record left the status this step was working for (say, it is being deleted)."""


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failures in a row.

    "Equal jitter": half the exponential step, plus up to the other half at
    random, so that databases that failed together do not retry together.
    """
    step = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2 ** (attempts - 1))
    return step / 2 + random.uniform(0, step / 2)


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
        templates: "Templates | None" = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.records = records
        self.vault = vault
        self._server_admin = server_admin
        self._claims = claims
        self._authority = authority
        # Touched after every complete pass, for `dbprov worker --check`.
        self._heartbeat = heartbeat
        self._pool = pool
        self._templates = templates
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_parallel_provisioning, thread_name_prefix="dbprov-task"
        )
        self._inflight: dict[str, Future] = {}
        self._deferred: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # The earliest postponed attempt, so the loop wakes for it.
        self._next_due: datetime | None = None
        # The outage last reported, so that a long one is logged once, not every pass.
        self._outage: str | None = None
        self._purged_at = 0.0
        # When each ready database's clients were last counted, for the idle stop.
        self._idle_checked: dict[str, float] = {}

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

    def _loop(self) -> None:
        wanted = self.records.wanted
        while not self._stopping.is_set():
            seen = wanted.generation
            try:
                self.run_once()
                if self._heartbeat is not None:
                    self._heartbeat.touch()
            except TransientError as exc:
                self._report_outage(f"reconcile pass skipped: {exc.detail}")
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad pass
                log.exception("reconcile pass failed")
            wanted.wait(self._idle_time(), since=seen)

    def _idle_time(self) -> float:
        interval = self.settings.reconcile_interval
        if self._next_due is None:
            return interval
        return max(0.05, min(interval, (self._next_due - utcnow()).total_seconds()))

    def _report_outage(self, text: str | None) -> None:
        if text == self._outage:
            return
        if text is not None:
            log.warning("%s", text)
        else:
            log.info("reconcile passes resumed")
        self._outage = text

    def run_once(self, wait: bool = False) -> None:
        """One pass over every live record and every server of this installation."""
        if self._pool is not None:
            # Before the records are read, so the new members are provisioned in this pass.
            self._pool.stock()
        # Servers first, records second: a server made after the listing
        # cannot be mistaken for an orphan, since its record predates it.
        try:
            servers: dict[str, ServerInfo] | None = {
                s.database_id: s for s in self.runtime.list_servers()
            }
            self._report_outage(None)
        except TransientError as exc:
            # Provisioning and deletion still count their attempts; drift and
            # orphans wait for an engine that answers.
            self._report_outage(f"engine unavailable, drift repair and sweep postponed: {exc.detail}")
            servers = None
        with self.store.read() as session:
            # Only what a pass decides on: whole records (their JSON columns
            # above all) would cost most of a pass at 10,000 of them. A task
            # loads the one record it works on.
            records = session.execute(select(*_PASS_COLUMNS).where(Database.status.in_(LIVE))).all()
            snapshots = list(session.scalars(select(Snapshot).where(Snapshot.status.in_(SNAPSHOT_LIVE))))
        now = utcnow()
        next_due = None
        idle_stop = self.settings.idle_stop is not None
        # A snapshot asked for before a reset or a delete is of the data as
        # it was: those wait for it (it is taken below, under the same claim).
        snapshotting = {s.database_id for s in snapshots if s.status == SnapshotStatus.PENDING}
        for record in records:
            if record.expires_at is not None and record.status not in GOING:
                if record.expires_at > now:
                    next_due = min(next_due or record.expires_at, record.expires_at)
                elif self._expired(record, now):
                    record = self._expire(record)
                    if record is None:
                        continue
            if record.next_attempt_at is not None and record.next_attempt_at > now:
                next_due = min(next_due or record.next_attempt_at, record.next_attempt_at)
                continue  # postponed after a transient failure
            if record.pending_since is not None and record.pending_since < now - _ROTATION_GRACE:
                if record.status == Status.READY:
                    self._submit(record.id, self._finish_rotation)
                    continue
            task = self._TASKS.get(record.status)
            if task is not None:
                if record.status in _AFTER_SNAPSHOTS and record.id in snapshotting:
                    continue
                self._submit(record.id, getattr(self, task))
            elif record.status in RUNS and servers is not None:
                info = servers.get(record.id)
                # Most records of a large installation: nothing to do (inlined
                # for them, as a pass over 10,000 records counts each call).
                if not (record.status == Status.READY and info is not None and info.state == RUNNING
                        and record.server_host is not None):
                    self._check_drift(record, info)
                if idle_stop:
                    self._maybe_check_idle(record)
        self._next_due = next_due
        for snapshot in snapshots:
            if snapshot.status == SnapshotStatus.PENDING:
                # Under its database's claim: nothing else touches that server meanwhile.
                self._submit(snapshot.database_id, functools.partial(self._take_snapshot, snapshot.id))
            elif snapshot.status == SnapshotStatus.DELETING:
                self._submit(snapshot.id, functools.partial(self._drop_snapshot, snapshot.id))
        if servers is not None:
            self._sweep_orphans(records, snapshots, servers)
        self._purge()
        if wait:
            self.wait_idle()

    # What the reconciler does for a record in each status that asks for work.
    _TASKS = {
        Status.PENDING: "_provision",
        Status.PROVISIONING: "_provision",
        Status.STARTING: "_resume",
        Status.RESETTING: "_resume",
        Status.STOPPING: "_stop",
        Status.DELETING: "_teardown",
    }

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

    def _submit(self, database_id: str, task: Callable[[str], None]) -> None:
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

    def _run_task(self, database_id: str, task: Callable[[str], None]) -> None:
        try:
            with self._claims.hold(database_id) as claimed:
                # Unclaimed: another reconciler works on it; a later pass looks again.
                if claimed:
                    self._attempt(database_id, task)
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

    def _attempt(self, database_id: str, task: Callable[[str], None]) -> None:
        """Run one step and decide what its failure means."""
        try:
            try:
                task(database_id)
            except TransientError as exc:
                self._retry_later(database_id, exc.detail, node_away=isinstance(exc, NodeUnavailable))
            except DataLost as exc:
                self._lose(database_id, exc.detail)
            except PermanentError as exc:
                self._fail(database_id, exc.detail)
            except DbprovError as exc:
                # Raised on purpose but not classified: a bug, retried like a transient error.
                log.error("database %s: unclassified error: %s", database_id, exc.detail)
                self._retry_later(database_id, exc.detail)
        except Superseded:
            pass  # the record moved on; the next pass sees what it wants now

    def _retry_later(self, database_id: str, error: str, node_away: bool = False) -> None:
        """Count the attempt and set the next one, or fail once the budget is spent.

        A database that was ready once, waiting for the machine that holds its
        data (``node_away``), spends no budget however long that takes: its
        data is there, and failing it would help nobody. A new one keeps the
        budget, so that a CI job does not wait for ever.
        """
        record = self._load(database_id)
        if record.status not in self._TASKS:
            return
        waits = node_away and record.ready_at is not None
        now = utcnow()
        since = record.retrying_since or now
        attempts = record.attempts + 1
        elapsed = (now - since).total_seconds()
        if record.status in COMING_UP and not waits and elapsed >= self.settings.retry_budget:
            self._fail(
                database_id,
                f"gave up after {attempts} attempts over {elapsed:.0f} s "
                f"(DBPROV_RETRY_BUDGET is {self.settings.retry_budget:g} s); last error: {error}",
            )
            return
        delay = backoff(attempts)
        self.records.transition(
            database_id,
            {record.status},
            attempts=attempts,
            # No streak runs while it waits: the budget counts from the node's return.
            retrying_since=None if waits else since,
            next_attempt_at=now + timedelta(seconds=delay),
            last_error=f"{error} (attempt {attempts}; next in {delay:.0f} s)",
            event="retrying",
            details={"attempt": attempts, "error": error.splitlines()[0]},
        )
        log.warning(
            "database %s: %s; attempt %d, next in %.1f s", database_id, error, attempts, delay
        )

    def _load(self, database_id: str) -> Database:
        with self.store.read() as session:
            record = session.get(Database, database_id)
        if record is None:
            raise Superseded(database_id)
        return record

    def _transition(self, database_id: str, expected: set[Status], **values) -> Database:
        record = self.records.transition(database_id, expected, **values)
        if record is None:
            raise Superseded(database_id)
        return record

    # -- provisioning -------------------------------------------------------

    def _provision(self, database_id: str) -> None:
        record = self._load(database_id)
        if record.status not in SETTLING:
            raise Superseded(database_id)
        if record.status == Status.PENDING:
            record = self._transition(database_id, {Status.PENDING}, status=Status.PROVISIONING)
            log.info("database %s: provisioning on port %s", database_id, record.host_port)
        self._bring_up(record, "ready")

    def _resume(self, database_id: str) -> None:
        """A stopped database started, or one put back to a snapshot."""
        record = self._load(database_id)
        if record.status not in (Status.STARTING, Status.RESETTING):
            raise Superseded(database_id)
        self._bring_up(record, "started" if record.status == Status.STARTING else "reset")

    def _bring_up(self, record: Database, event: str) -> None:
        """Server running, ``SELECT 1`` as the tenant working: then ready."""
        status = record.status
        timings: dict[str, float] = {}
        started = time.monotonic()
        if record.source_snapshot_id is not None and record.seeded_at is None:
            record = self._seed(record)
            timings["copy"] = round(time.monotonic() - started, 3)
        elif record.ready_at is not None:
            # Its data was there once: a server made without it would be a new,
            # empty one, started as if nothing had happened.
            info = self.runtime.inspect_server(record.id)
            if info is None or not info.has_data:
                raise DataLost(
                    f"the data of database {record.id} is gone: its server and volume were removed "
                    "outside dbprov (a `docker system prune --volumes`, say)"
                )
        phase = time.monotonic()
        record = self._ensure_server(record)
        timings["server"] = round(time.monotonic() - phase, 3)
        phase = time.monotonic()
        self._wait_ready(record, admin_login(record, self.vault))
        timings["ready"] = round(time.monotonic() - phase, 3)
        phase = time.monotonic()
        self._setup_tenant(record)
        timings["setup"] = round(time.monotonic() - phase, 3)
        timings["total"] = round(time.monotonic() - started, 3)
        self._transition(
            record.id,
            {status},
            status=Status.READY,
            server_host=record.server_host,
            tls=record.tls,
            ready_at=record.ready_at or utcnow(),
            active_at=utcnow(),
            phase_timings=timings,
            last_error=None,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
            event=event,
            details={"port": record.host_port, "seconds": timings["total"]},
        )
        log.info(
            "database %s: %s on port %s (%.2f s)", record.id, event, record.host_port, timings["total"]
        )

    def _seed(self, record: Database) -> Database:
        """The record's data made a copy of its snapshot, before any server runs on it."""
        with self.store.read() as session:
            snapshot = session.get(Snapshot, record.source_snapshot_id)
        if snapshot is None or snapshot.status in (SnapshotStatus.FAILED, SnapshotStatus.DELETED):
            state = snapshot.status.value if snapshot else "gone"
            raise ServerFailed(f"the snapshot {record.source_snapshot_id} to copy is {state}")
        if snapshot.status != SnapshotStatus.READY:
            raise TransientError(f"waiting for the snapshot {snapshot.id} to be taken")
        # Whatever a crash or the data before a reset left goes first.
        self.runtime.remove_server(record.id)
        size = self.runtime.copy_data(snapshot.id, record.id, snapshot.image)
        log.info("database %s: data copied from snapshot %s (%d bytes)", record.id, snapshot.id, size)
        return self._transition(record.id, {record.status}, seeded_at=utcnow())

    def _ensure_server(self, record: Database) -> Database:
        """The server runs; returns the record as it now is (its port may have moved)."""
        status = record.status
        for _ in range(_PORT_RETRIES):
            try:
                endpoint = self.runtime.ensure_server(self._spec(record))
            except PortInUse as exc:
                # Something outside dbprov holds the port: move to another one.
                log.warning("database %s: port %s taken (%s); moving", record.id, record.host_port, exc.detail)
                with self.store.transaction() as session:
                    port = pick_port(session, self.settings.port_range)
                record = self._transition(record.id, {status}, host_port=port)
                continue
            # Written with the status it reaches next: a write fewer on the way to ready.
            record.server_host, record.tls = endpoint.host, endpoint.tls
            return record
        raise PortInUse(f"no usable host port after {_PORT_RETRIES} attempts")

    def _spec(self, record: Database) -> ServerSpec:
        plan = self._plan(record)
        return ServerSpec(
            database_id=record.id,
            image=record.image,
            # The server's superuser is the service's; the tenant's role is
            # made once the server is up (see _setup_tenant).
            superuser=record.admin_username,
            superuser_password=self.vault.decrypt(record.admin_password),
            port=record.host_port,
            command=(
                "postgres",
                *self.settings.postgres_args,
                # The plan's settings come last, so they win over the general ones.
                *(arg for name, value in plan.settings.items() for arg in ("-c", f"{name}={value}")),
            ),
            memory_limit=plan.memory,
            cpus=plan.cpus,
            pids_limit=self.settings.pids_limit,
            tls=self._authority.issuer(record.id),
            # No CREATE DATABASE at initialisation (it costs a noticeable
            # share of the start-up): the tenant's database is the initial
            # "postgres" one, renamed when the tenant's role is made.
            extra_environment={"POSTGRES_DB": "postgres"},
        )

    def _plan(self, record: Database) -> Plan:
        plans = self.settings.all_plans
        if record.plan not in plans:
            # The operator withdrew it: its databases keep running, at the default size.
            log.warning("database %s: plan %r is no longer offered; using the default", record.id, record.plan)
        return plans.get(record.plan, plans["default"])

    def _setup_tenant(self, record: Database) -> None:
        """The tenant's role, then the check that counts: ``SELECT 1`` as the tenant.

        A warm pool member gets its role and password too, so that its claim
        needs no round trip to the server.
        """
        try:
            set_up_tenant(self._server_admin, record, self.vault)
        except psycopg.Error as exc:
            raise ServerFailed(
                self._failure_text(record.id, "tenant role setup failed", _first_line(exc))
            ) from None

    def _wait_ready(self, record: Database, login: Login) -> None:
        """Poll until ``login`` works over the published port."""
        deadline = time.monotonic() + self.settings.ready_timeout
        last_error = "no attempt made"
        next_status_check = time.monotonic() + 1.0
        next_inspect = 0.0
        while True:
            # The engine is asked less often than the server: each inspection
            # costs the engine CPU that the starting server would rather have.
            if time.monotonic() >= next_inspect:
                info = self.runtime.inspect_server(record.id)
                if info is not None and info.state == UNREACHABLE:
                    # Not the server's failure: it waits for its machine.
                    raise NodeUnavailable(f"{info.reason}: the server of {record.id} waits for it")
                if info is None or info.state != RUNNING or info.restarts:
                    state = info.reason if info else "vanished"
                    raise ServerFailed(self._failure_text(record.id, f"server {state}", last_error))
                next_inspect = time.monotonic() + 0.25
            try:
                self._server_admin.check(login)
                return
            except psycopg.Error as exc:
                last_error = _first_line(exc)
            if time.monotonic() >= deadline:
                raise ServerFailed(
                    self._failure_text(
                        record.id,
                        f"not ready within {self.settings.ready_timeout:g} s (server {info.reason})",
                        last_error,
                    )
                )
            if self._stopping.is_set():
                raise Superseded(record.id)
            if time.monotonic() >= next_status_check:
                # A DELETE may have come in: stop waiting for a database nobody wants.
                if self._load(record.id).status != record.status:
                    raise Superseded(record.id)
                next_status_check = time.monotonic() + 1.0
            # A short fixed interval rather than a growing one: a refused
            # connection costs next to nothing, and a backoff would add up to
            # its last step to every database's time to ready.
            time.sleep(_POLL_INTERVAL)

    def _failure_text(self, database_id: str, what: str, last_error: str) -> str:
        logs = self.runtime.server_logs(database_id, tail=30).rstrip()
        return f"{what}; last connection error: {last_error}\nserver log (last lines):\n{logs}"

    def _fail(self, database_id: str, error: str) -> None:
        """Record the failure and leave nothing running or holding a port.

        A database that was ready once keeps its data: it is the tenant's,
        and DELETE is what discards it.
        """
        record = self._load(database_id)
        kept = record.ready_at is not None
        try:
            self.runtime.remove_server(database_id, keep_data=kept)
        except TransientError as exc:
            # The orphan sweep removes it once the engine answers.
            log.warning("database %s: server left for the sweep: %s", database_id, exc.detail)
        if kept:
            error += (
                "\nIts data is kept: POST /databases/{id}/start tries again (on a new port), "
                "DELETE discards it.".format(id=database_id)
            )
        self._transition(
            database_id,
            COMING_UP,
            status=Status.FAILED,
            details={"error": error.splitlines()[0]},
            last_error=error,
            host_port=None,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
        )
        log.warning("database %s: failed: %s", database_id, error.splitlines()[0])

    def _lose(self, database_id: str, reason: str) -> None:
        """Say out loud that the data is gone, and the ways back."""
        self._transition(
            database_id,
            COMING_UP | RUNS,
            status=Status.LOST,
            details={"reason": reason},
            last_error=f"{reason}.\nWays back: POST /databases/{database_id}/reset with a snapshot of it "
                       "(GET /snapshots); or DELETE it.",
            host_port=None,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
        )
        log.warning("database %s: lost: %s", database_id, reason)

    # -- snapshots ----------------------------------------------------------

    def _take_snapshot(self, snapshot_id: str, database_id: str) -> None:
        """A clean stop, a copy of the data, and the server started again."""
        with self.store.read() as session:
            snapshot = session.get(Snapshot, snapshot_id)
        record = self._load(database_id)
        if snapshot is None or snapshot.status != SnapshotStatus.PENDING:
            return
        # A reset or a delete asked for after the snapshot waits for it (see
        # run_once): the data is still as it was, and needs no restart after.
        after = record.status in _AFTER_SNAPSHOTS
        if record.status not in (Status.READY, Status.STOPPED) and not after:
            if record.status in GOING | {Status.FAILED}:
                self._settle_snapshot(snapshot, error=f"its database is {record.status.value}")
            return  # stopping or starting: the next pass tries again
        started = time.monotonic()
        running = record.status == Status.READY
        try:
            if running or after:
                # A clean shutdown ends with a checkpoint: the copy needs no recovery.
                self.runtime.stop_server(database_id)
            size = self.runtime.copy_data(database_id, snapshot_id, record.image)
        except TransientError as exc:
            log.warning("snapshot %s: postponed: %s", snapshot_id, exc.detail)
            return
        except PermanentError as exc:
            self._settle_snapshot(snapshot, error=exc.detail)
            return
        finally:
            if running:
                self._restart_after_snapshot(record)
        seconds = round(time.monotonic() - started, 3)
        self._settle_snapshot(snapshot, size=size)
        with self.store.transaction() as session:
            self.records.event(session, record, "snapshot-taken", SERVICE,
                               {"snapshot": snapshot_id, "bytes": size, "seconds": seconds})
        log.info("snapshot %s of database %s: %d bytes in %.2f s", snapshot_id, database_id, size, seconds)

    def _restart_after_snapshot(self, record: Database) -> None:
        try:
            self.runtime.start_server(record.id)
            self._wait_ready(record, admin_login(record, self.vault))
        except DbprovError as exc:
            # Drift repair starts it again on a later pass.
            log.warning("database %s: not back after its snapshot yet: %s", record.id, exc.detail)

    def _settle_snapshot(self, snapshot: Snapshot, size: int | None = None, error: str | None = None) -> None:
        with self.store.transaction() as session:
            session.execute(
                update(Snapshot)
                .where(Snapshot.id == snapshot.id, Snapshot.status == SnapshotStatus.PENDING)
                .values(
                    status=SnapshotStatus.FAILED if error else SnapshotStatus.READY,
                    size_bytes=size, last_error=error, ready_at=None if error else utcnow(),
                )
            )
            self.records.announce(session)
            if snapshot.template_id is not None and self._templates is not None:
                self._templates.settle(session, snapshot.template_id, snapshot_ready=error is None)
        if error:
            log.warning("snapshot %s failed: %s", snapshot.id, error)

    def _drop_snapshot(self, snapshot_id: str, _key: str) -> None:
        self.runtime.remove_server(snapshot_id)
        with self.store.transaction() as session:
            session.execute(
                update(Snapshot)
                .where(Snapshot.id == snapshot_id, Snapshot.status == SnapshotStatus.DELETING)
                .values(status=SnapshotStatus.DELETED, deleted_at=utcnow())
            )
        log.info("snapshot %s deleted", snapshot_id)

    def _finish_rotation(self, database_id: str) -> None:
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

    # -- stop, expiry, idle -------------------------------------------------

    def _stop(self, database_id: str) -> None:
        self.runtime.stop_server(database_id)
        self._transition(
            database_id, {Status.STOPPING}, status=Status.STOPPED, attempts=0, next_attempt_at=None,
            retrying_since=None, last_error=None,
        )
        self._idle_checked.pop(database_id, None)
        log.info("database %s: stopped", database_id)

    @staticmethod
    def _expired(record: Database, now: datetime) -> bool:
        return (
            record.expires_at is not None
            and record.expires_at <= now
            and record.status not in GOING
            and not record.protected
            and record.tenant != POOL_TENANT
        )

    def _expire(self, record: Database) -> Database | None:
        """Delete an expired database the way a DELETE does; None if it moved on."""
        expired = self.records.transition(
            record.id, LIVE - GOING, only_if=Database.protected.is_(False), status=Status.DELETING,
            event="expired", details={"expires_at": record.expires_at.isoformat()},
        )
        if expired is not None:
            log.info("database %s: expired at %s; deleting it", record.id, record.expires_at.isoformat())
        return expired

    def _maybe_check_idle(self, record: Database) -> None:
        idle_stop = self.settings.idle_stop
        # An unavailable one has no clients to count, nor a server to stop.
        if idle_stop is None or record.tenant == POOL_TENANT or record.status != Status.READY:
            return
        # A quarter of the idle time between counts (at most a minute) keeps
        # a stop within 25 % of its time without a connection per pass.
        if time.monotonic() - self._idle_checked.get(record.id, 0.0) < min(idle_stop / 4, 60.0):
            return
        self._idle_checked[record.id] = time.monotonic()
        self._submit(record.id, self._check_idle)

    def _check_idle(self, database_id: str) -> None:
        """Count the tenant's connections; stop a database idle for DBPROV_IDLE_STOP."""
        record = self._load(database_id)
        if record.status != Status.READY:
            return
        try:
            clients = self._server_admin.client_connections(
                admin_login(record, self.vault), record.database_name
            )
        except psycopg.Error:
            return  # down: drift repair deals with it, and the next count decides
        now = utcnow()
        if clients:
            self.records.transition(database_id, {Status.READY}, active_at=now)
            return
        idle_since = record.active_at or record.ready_at or now
        if (now - idle_since).total_seconds() >= self.settings.idle_stop:
            stopping = self.records.transition(
                database_id, {Status.READY}, status=Status.STOPPING, event="idle-stopped",
                details={"idle_since": idle_since.isoformat()},
            )
            if stopping is not None:
                log.info("database %s: no clients since %s; stopping it", database_id, idle_since.isoformat())
                self._stop(database_id)

    # -- deletion -----------------------------------------------------------

    def _teardown(self, database_id: str) -> None:
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
            session.execute(
                update(Snapshot)
                .where(
                    Snapshot.owner_id == database_id,
                    Snapshot.status.in_([SnapshotStatus.PENDING, SnapshotStatus.READY, SnapshotStatus.FAILED]),
                )
                .values(status=SnapshotStatus.DELETING)
            )
        log.info("database %s: deleted", database_id)

    # -- drift --------------------------------------------------------------

    def _check_drift(self, record: Database, info: ServerInfo | None) -> None:
        if info is not None and info.state == UNREACHABLE:
            # Its data is on a machine that is away: nothing is started or
            # made anew (it would start empty) until that machine is back.
            if record.status == Status.READY:
                self._mark_unavailable(record, info.reason)
        elif info is None:
            # Neither its server nor its data: made anew, it would be empty.
            self._submit(record.id, self._lose_vanished)
        elif info.state == ABSENT:
            log.warning("database %s: server vanished; making it anew on its data", record.id)
            if self.records.transition(record.id, RUNS, status=Status.PROVISIONING):
                self._submit(record.id, self._provision)
        elif record.status == Status.UNAVAILABLE:
            self._submit(record.id, self._recover)
        elif info.state != RUNNING:
            # As a task, under the database's claim: a snapshot stops the
            # server on purpose, and holds the claim while it copies.
            self._submit(record.id, self._repair)
        elif record.server_host is None:
            # A record from before the column: ask the runtime once.
            endpoint = self.runtime.endpoint(record.id)
            if endpoint is not None:
                self.records.transition(record.id, {Status.READY}, server_host=endpoint.host)

    def _lose_vanished(self, database_id: str) -> None:
        """A running database whose server and data both vanished, asked again
        under its claim: a snapshot or a start may have been between them."""
        record = self._load(database_id)
        if record.status in RUNS and self.runtime.inspect_server(database_id) is None:
            raise DataLost(f"the server and the data of database {database_id} vanished outside dbprov")

    def _mark_unavailable(self, record: Database, reason: str) -> None:
        if self.records.transition(
            record.id, {Status.READY}, status=Status.UNAVAILABLE, last_error=reason,
            event="unavailable", details={"reason": reason},
        ):
            log.warning("database %s: unavailable until its machine is back: %s", record.id, reason)

    def _recover(self, database_id: str) -> None:
        """An unavailable database whose machine is back: its server started if
        need be, then ready again once ``SELECT 1`` works. If it does not come
        up, it stays unavailable with the reason, and a later pass tries again
        after a backoff (a write wakes the loop at once)."""
        record = self._load(database_id)
        info = self.runtime.inspect_server(database_id)
        if record.status != Status.UNAVAILABLE or info is None or info.state in (ABSENT, UNREACHABLE):
            return  # the next pass decides
        try:
            if info.state != RUNNING:
                log.info("database %s: its machine is back, its server %s; starting it", database_id, info.reason)
                self.runtime.start_server(database_id)
            # The machine's address, or its public name, may have changed meanwhile.
            endpoint = self.runtime.endpoint(database_id)
            if endpoint is not None and endpoint.host != record.server_host:
                record = self._transition(database_id, {Status.UNAVAILABLE}, server_host=endpoint.host)
            self._wait_ready(record, admin_login(record, self.vault))
        except DbprovError as exc:
            delay = backoff(record.attempts + 1)
            self.records.transition(
                database_id, {Status.UNAVAILABLE}, last_error=exc.detail, attempts=record.attempts + 1,
                next_attempt_at=utcnow() + timedelta(seconds=delay),
            )
            log.warning(
                "database %s: still unavailable: %s; next try in %.1f s",
                database_id, exc.detail.splitlines()[0], delay,
            )
            return
        self._transition(
            database_id, {Status.UNAVAILABLE}, status=Status.READY, last_error=None, active_at=utcnow(),
            attempts=0, next_attempt_at=None, event="available",
        )
        log.info("database %s: available again", database_id)

    def _repair(self, database_id: str) -> None:
        """Start the stopped or crashed server of a ready database."""
        record = self._load(database_id)
        info = self.runtime.inspect_server(database_id)
        if record.status != Status.READY or info is None or info.state in (RUNNING, ABSENT):
            return
        log.warning("database %s: server is %s; starting it", database_id, info.reason)
        try:
            self.runtime.start_server(database_id)
        except DbprovError as exc:
            log.warning("database %s: could not start its server: %s", database_id, exc.detail)

    def _sweep_orphans(
        self, records: list[Database], snapshots: list[Snapshot], servers: dict[str, ServerInfo]
    ) -> None:
        owners = set()
        # A failed database that was ready once keeps its data until DELETE;
        # a snapshot's data is stored like a server's, without one.
        data_owners = {s.id for s in snapshots}
        for r in records:
            if r.status in OWNS_SERVER:
                owners.add(r.id)
            elif r.status == Status.FAILED and r.was_ready:
                data_owners.add(r.id)
        data_owners |= owners
        with self._lock:
            busy = set(self._inflight)
        for database_id, info in servers.items():
            if database_id in owners or database_id in busy:
                continue
            keep_data = database_id in data_owners
            # A kept data's machine that is away: nothing of it to remove until it is back.
            if keep_data and info.state in (ABSENT, UNREACHABLE):
                continue
            log.warning(
                "removing orphan %s of database %s", "server" if keep_data else "server and data", database_id
            )
            try:
                self.runtime.remove_server(database_id, keep_data=keep_data)
            except TransientError as exc:
                # One orphan on a machine that is away must not hold up the others.
                log.warning("orphan of database %s left for a later pass: %s", database_id, exc.detail)


def _first_line(exc: Exception) -> str:
    # The rest of a libpq message repeats host and port.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
