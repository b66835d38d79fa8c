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
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import psycopg
from sqlalchemy import select

from .coordination import Claims
from .crypto import Vault
from .errors import (
    DbprovError,
    PermanentError,
    PortInUse,
    ServerFailed,
    TransientError,
)
from .models import LIVE, OWNS_SERVER, SETTLING, Database, Status, utcnow
from .pool import WarmPool
from .ports import pick_port
from .postgres import Login, ServerAdmin, admin_login, set_up_tenant
from .records import Records
from .runtime import ABSENT, RUNNING, ServerInfo, ServerRuntime, ServerSpec
from .settings import Settings
from .store import Store
from .tenancy import POOL_TENANT

log = logging.getLogger(__name__)

_PORT_RETRIES = 5
_POLL_INTERVAL = 0.025
# Backoff of transient failures: 1 s, 2 s, 4 s ... up to a minute, each with jitter.
_BACKOFF_FIRST = 1.0
_BACKOFF_CAP = 60.0


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
        heartbeat: Path | None = None,
        pool: WarmPool | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.records = records
        self.vault = vault
        self._server_admin = server_admin
        self._claims = claims
        # Touched after every complete pass, for `dbprov worker --check`.
        self._heartbeat = heartbeat
        self._pool = pool
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_parallel_provisioning, thread_name_prefix="dbprov-task"
        )
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # The earliest postponed attempt, so the loop wakes for it.
        self._next_due: datetime | None = None
        # The outage last reported, so that a long one is logged once, not every pass.
        self._outage: str | None = None

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
            log.info("the engine answers again")
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
            records = list(session.scalars(select(Database).where(Database.status.in_(LIVE))))
        now = utcnow()
        self._next_due = min(
            (r.next_attempt_at for r in records if r.next_attempt_at and r.next_attempt_at > now),
            default=None,
        )
        for record in records:
            if record.next_attempt_at is not None and record.next_attempt_at > now:
                continue  # postponed after a transient failure
            if record.status in SETTLING:
                self._submit(record.id, self._provision)
            elif record.status == Status.DELETING:
                self._submit(record.id, self._teardown)
            elif record.status == Status.READY and servers is not None:
                self._check_drift(record, servers.get(record.id))
        if servers is not None:
            self._sweep_orphans(records, servers)
        if wait:
            self.wait_idle()

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
            if database_id in self._inflight or self._stopping.is_set():
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

    def _attempt(self, database_id: str, task: Callable[[str], None]) -> None:
        """Run one step and decide what its failure means."""
        try:
            try:
                task(database_id)
            except TransientError as exc:
                self._retry_later(database_id, exc.detail)
            except PermanentError as exc:
                self._fail(database_id, exc.detail)
            except DbprovError as exc:
                # Raised on purpose but not classified: a bug, retried like a transient error.
                log.error("database %s: unclassified error: %s", database_id, exc.detail)
                self._retry_later(database_id, exc.detail)
        except Superseded:
            pass  # the record moved on; the next pass sees what it wants now

    def _retry_later(self, database_id: str, error: str) -> None:
        """Count the attempt and set the next one, or fail once the budget is spent."""
        record = self._load(database_id)
        if record.status not in SETTLING | {Status.DELETING}:
            return
        now = utcnow()
        since = record.retrying_since or now
        attempts = record.attempts + 1
        elapsed = (now - since).total_seconds()
        if record.status in SETTLING and elapsed >= self.settings.retry_budget:
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
            retrying_since=since,
            next_attempt_at=now + timedelta(seconds=delay),
            last_error=f"{error} (attempt {attempts}; next in {delay:.0f} s)",
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
        timings: dict[str, float] = {}
        started = time.monotonic()
        record = self._ensure_server(record)
        timings["server"] = round(time.monotonic() - started, 3)
        phase = time.monotonic()
        self._wait_ready(record, admin_login(record, self.vault))
        timings["ready"] = round(time.monotonic() - phase, 3)
        phase = time.monotonic()
        self._setup_tenant(record)
        timings["setup"] = round(time.monotonic() - phase, 3)
        timings["total"] = round(time.monotonic() - started, 3)
        self._transition(
            database_id,
            {Status.PROVISIONING},
            status=Status.READY,
            ready_at=record.ready_at or utcnow(),
            phase_timings=timings,
            last_error=None,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
        )
        log.info(
            "database %s: ready on port %s (%.2f s)", database_id, record.host_port, timings["total"]
        )

    def _ensure_server(self, record: Database) -> Database:
        """The server runs; returns the record as it now is (its port may have moved)."""
        for _ in range(_PORT_RETRIES):
            try:
                endpoint = self.runtime.ensure_server(self._spec(record))
            except PortInUse as exc:
                # Something outside dbprov holds the port: move to another one.
                log.warning("database %s: port %s taken (%s); moving", record.id, record.host_port, exc.detail)
                with self.store.transaction() as session:
                    port = pick_port(session, self.settings.port_range)
                record = self._transition(record.id, {Status.PROVISIONING}, host_port=port)
                continue
            return self._transition(record.id, {Status.PROVISIONING}, server_host=endpoint.host)
        raise PortInUse(f"no usable host port after {_PORT_RETRIES} attempts")

    def _spec(self, record: Database) -> ServerSpec:
        return ServerSpec(
            database_id=record.id,
            image=record.image,
            # The server's superuser is the service's; the tenant's role is
            # made once the server is up (see _setup_tenant).
            environment={
                "POSTGRES_USER": record.admin_username,
                "POSTGRES_PASSWORD": self.vault.decrypt(record.admin_password),
                # No CREATE DATABASE at initialisation (it costs a noticeable
                # share of the start-up): the tenant's database is the initial
                # "postgres" one, renamed when the tenant's role is made.
                "POSTGRES_DB": "postgres",
            },
            port=record.host_port,
            command=("postgres", *self.settings.postgres_args),
            memory_limit=self.settings.memory_limit,
            pids_limit=self.settings.pids_limit,
        )

    def _setup_tenant(self, record: Database) -> None:
        """The tenant's role, then the check that counts: ``SELECT 1`` as the tenant."""
        if record.tenant == POOL_TENANT:
            return  # a warm server gets its tenant's role when it is claimed
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
                if self._load(record.id).status != Status.PROVISIONING:
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
        try:
            self.runtime.remove_server(database_id, keep_data=record.ready_at is not None)
        except TransientError as exc:
            # The orphan sweep removes it once the engine answers.
            log.warning("database %s: server left for the sweep: %s", database_id, exc.detail)
        self._transition(
            database_id,
            SETTLING,
            status=Status.FAILED,
            last_error=error,
            host_port=None,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
        )
        log.warning("database %s: failed: %s", database_id, error.splitlines()[0])

    # -- deletion -----------------------------------------------------------

    def _teardown(self, database_id: str) -> None:
        self.runtime.remove_server(database_id)
        self._transition(
            database_id,
            {Status.DELETING},
            status=Status.DELETED,
            deleted_at=utcnow(),
            host_port=None,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
        )
        log.info("database %s: deleted", database_id)

    # -- drift --------------------------------------------------------------

    def _check_drift(self, record: Database, info: ServerInfo | None) -> None:
        if info is None or info.state == ABSENT:
            log.warning("database %s: server vanished; making it anew on its data", record.id)
            if self.records.transition(record.id, {Status.READY}, status=Status.PROVISIONING):
                self._submit(record.id, self._provision)
        elif info.state != RUNNING:
            log.warning("database %s: server is %s; starting it", record.id, info.reason)
            try:
                self.runtime.start_server(record.id)
            except DbprovError as exc:
                log.warning("database %s: could not start its server: %s", record.id, exc.detail)
        elif record.server_host is None:
            # A record from before the column: ask the runtime once.
            endpoint = self.runtime.endpoint(record.id)
            if endpoint is not None:
                self.records.transition(record.id, {Status.READY}, server_host=endpoint.host)

    def _sweep_orphans(self, records: list[Database], servers: dict[str, ServerInfo]) -> None:
        owners = {r.id for r in records if r.status in OWNS_SERVER}
        # A failed database that was ready once keeps its data until DELETE.
        data_owners = owners | {r.id for r in records if r.status == Status.FAILED and r.ready_at}
        with self._lock:
            busy = set(self._inflight)
        for database_id, info in servers.items():
            if database_id in owners or database_id in busy:
                continue
            keep_data = database_id in data_owners
            if keep_data and info.state == ABSENT:
                continue
            log.warning(
                "removing orphan %s of database %s", "server" if keep_data else "server and data", database_id
            )
            self.runtime.remove_server(database_id, keep_data=keep_data)


def _first_line(exc: Exception) -> str:
    # The rest of a libpq message repeats host and port.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
