"""Bringing a database up: its data seeded, its server made or started, its tenant set up, then ready.

Provisioning makes a new database; a start or a reset brings one up on the
data it has (or on a copy of a snapshot). Either ends with ``SELECT 1`` as
the tenant working over the published port.
"""

from __future__ import annotations

import logging
import time

import psycopg

from ..domain.models import SETTLING, Database, Snapshot, SnapshotStatus, Status, utcnow
from ..domain.ports import pick_port
from ..errors import DataLost, NodeUnavailable, PortInUse, ServerFailed, TransientError
from ..postgres.admin import Login, admin_login, set_up_tenant
from ..postgres.tls import Authority
from ..runtime.protocol import RUNNING, UNREACHABLE, ServerSpec
from ..settings import Plan
from .steps import Context, Step, Superseded

log = logging.getLogger(__name__)

_PORT_RETRIES = 5
_POLL_INTERVAL = 0.01
# The event each kind of resumption ends with.
# A database that need not be durable: no write waits for the disk. A commit
# still writes its WAL to the kernel before it returns (synchronous_commit
# stays on: off, a kill of the server would lose the last commits), so a
# crash of the server loses nothing, the page cache holding every write; a
# crash of the machine may lose or tear it.
_NOT_DURABLE = ("-c", "fsync=off", "-c", "full_page_writes=off")
_RESUMED = {Status.STARTING: "started", Status.WAKING: "woken", Status.RESETTING: "reset"}


class Provisioning(Step):
    """The steps of a pending, provisioning, starting or resetting database."""

    def __init__(self, ctx: Context, authority: Authority) -> None:
        super().__init__(ctx)
        self._server_admin = ctx.server_admin
        self._authority = authority
        self._stopping = ctx.stopping

    def provision(self, database_id: str) -> None:
        record = self._load(database_id)
        if record.status not in SETTLING:
            raise Superseded(database_id)
        if record.status == Status.PENDING:
            record = self._transition(database_id, {Status.PENDING}, status=Status.PROVISIONING)
            log.info("database %s: provisioning on port %s", database_id, record.host_port)
        self._bring_up(record, "ready")

    def resume(self, database_id: str) -> None:
        """A stopped database started, a sleeping one woken, or one put back to a snapshot."""
        record = self._load(database_id)
        if record.status not in _RESUMED:
            raise Superseded(database_id)
        self._bring_up(record, _RESUMED[record.status])

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
        # As late as can be: a connection that comes after this is refused
        # until the engine publishes the port again.
        self._give_back_port(record.id)
        record = self._ensure_server(record)
        timings["server"] = round(time.monotonic() - phase, 3)
        phase = time.monotonic()
        self.wait_ready(record, admin_login(record, self.vault))
        timings["ready"] = round(time.monotonic() - phase, 3)
        if status != Status.WAKING:
            # A sleeping one's role and password are in its data as it fell
            # asleep: nothing can have changed them since, and its clients wait.
            phase = time.monotonic()
            self._setup_tenant(record)
            timings["setup"] = round(time.monotonic() - phase, 3)
        timings["total"] = round(time.monotonic() - started, 3)
        if status == Status.WAKING:
            # As its first client waits: from its connection, if one woke it.
            since = self.sleepers.waiting_since(record.id) if self.sleepers is not None else None
            timings["wake"] = round(time.monotonic() - since, 3) if since is not None else timings["total"]
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
                # A copy of a running server's data (a snapshot on a storage
                # pool) starts with crash recovery, which first syncs the data
                # directory: one syncfs, not an fsync per file, keeps that from
                # growing with the data (0.4 s against 1.0-1.4 s at 10 GB).
                "-c", "recovery_init_sync_method=syncfs",
                *self.settings.postgres_args,
                # The plan's settings come after the general ones, so they win.
                *(arg for name, value in plan.settings.items() for arg in ("-c", f"{name}={value}")),
                # Last: the request asked for it, whatever the operator's defaults.
                *(() if record.durable else _NOT_DURABLE),
            ),
            memory_limit=plan.memory,
            cpus=plan.cpus,
            pids_limit=self.settings.pids_limit,
            tls=self._authority.issuer(record.id),
            # The tenant's database is made at initialisation, beside the
            # "postgres" one that initdb makes: on a golden copy both are in
            # the copy already, and setting the tenant up creates no database
            # (a CREATE DATABASE costs a checkpoint).
            extra_environment={"POSTGRES_DB": record.database_name},
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
        except psycopg.OperationalError as exc:
            # No session (a server swamped by connections, say): not the setup's failure.
            raise TransientError(f"tenant role setup postponed: {_first_line(exc)}") from None
        except psycopg.Error as exc:
            raise ServerFailed(
                self._failure_text(record.id, "tenant role setup failed", _first_line(exc))
            ) from None

    def wait_ready(self, record: Database, login: Login) -> None:
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


def _first_line(exc: Exception) -> str:
    # The rest of a libpq message repeats host and port.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
