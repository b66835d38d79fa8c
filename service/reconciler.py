"""The reconciler: the one component that changes containers.

It compares the metadata store with what the engine runs and closes the gap:
starts what is pending, removes what is being deleted, repairs drift and sweeps
orphans. Every step is idempotent, so a crash anywhere is finished or cleaned
up by the next pass.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import psycopg
from sqlalchemy import select, update

from .coordination import Claims, claims_for
from .crypto import Vault
from .errors import (
    ContainerRuntimeError,
    DbprovError,
    MetadataUnavailable,
    PortInUse,
    RuntimeUnavailable,
)
from .models import LIVE_STATUSES, Database, Status, utcnow
from .notify import Notifier
from .postgres import Login, PostgresAdmin, ServerAdmin
from .provisioning import admin_login, pick_port, set_up_tenant
from .tenancy import POOL_TENANT
from .runtime import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
    container_name,
    labels_for,
    volume_name,
)
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)

# Statuses whose record owns a container (failed ones had theirs removed).
_OWNS_CONTAINER = (Status.PENDING, Status.PROVISIONING, Status.READY, Status.DELETING)
_PORT_RETRIES = 5
_POLL_INTERVAL = 0.025


class Superseded(Exception):
    """The record left the status this step was working for (say, it is being deleted)."""


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: ContainerRuntime,
        wanted: Notifier,
        changed: Notifier,
        vault: Vault,
        server_admin: ServerAdmin | None = None,
        claims: Claims | None = None,
        heartbeat: Path | None = None,
        pool: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self._wanted = wanted
        self._changed = changed
        self.vault = vault
        self._server_admin = server_admin or PostgresAdmin()
        self._claims = claims or claims_for(store)
        # Touched after every complete pass, for `dbprov worker --check`.
        self._heartbeat = heartbeat
        # Records the warm pool's missing members (Databases.stock_pool).
        self._stock_pool = pool
        self._labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: settings.instance}
        # Found or made on the first provisioning; one lookup per process.
        self._network_id: str | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_parallel_provisioning, thread_name_prefix="dbprov-task"
        )
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dbprov-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; unfinished work is resumed by the next start."""
        self._stopping.set()
        self._wanted.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            seen = self._wanted.generation
            try:
                self.run_once()
                if self._heartbeat is not None:
                    self._heartbeat.touch()
            except (RuntimeUnavailable, MetadataUnavailable) as exc:
                log.warning("reconcile pass skipped: %s", exc)
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad pass
                log.exception("reconcile pass failed")
            self._wanted.wait(self.settings.reconcile_interval, since=seen)

    def run_once(self, wait: bool = False) -> None:
        """One pass over every live record and every labelled container and volume."""
        # Containers first, records second: a container made after the listing
        # cannot be mistaken for an orphan, since its record predates it.
        if self._stock_pool is not None:
            # Before the records are read, so the new members are provisioned in this pass.
            self._stock_pool()
        containers = {c.database_id: c for c in self.runtime.list_containers(self._labels)}
        volumes = {v.database_id: v for v in self.runtime.list_volumes(self._labels)}
        with self.store.read() as session:
            records = list(
                session.scalars(select(Database).where(Database.status.in_(LIVE_STATUSES)))
            )
        for record in records:
            if record.status in (Status.PENDING, Status.PROVISIONING):
                self._submit(record.id, self._provision)
            elif record.status == Status.DELETING:
                self._submit(record.id, self._teardown)
            elif record.status == Status.READY:
                self._check_drift(record, containers.get(record.id))
        self._sweep_orphans(records, containers, volumes)
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
                    task(database_id)
        except Superseded:
            self._wanted.notify()
        except (RuntimeUnavailable, MetadataUnavailable) as exc:
            # Nothing is decided on an outage: the next pass picks the record up again.
            log.warning("database %s: postponed: %s", database_id, exc)
        except Exception:  # noqa: BLE001 - one database's trouble must not stop the others
            log.exception("database %s: unexpected error", database_id)
        finally:
            with self._lock:
                self._inflight.pop(database_id, None)
            self._changed.notify()

    # -- record transitions -------------------------------------------------

    def _transition(self, database_id: str, expected: tuple[Status, ...], **values) -> None:
        """Write ``values`` only if the record is still in one of ``expected``."""
        with self.store.transaction() as session:
            result = session.execute(
                update(Database)
                .where(Database.id == database_id, Database.status.in_(expected))
                .values(updated_at=utcnow(), **values)
            )
            self.store.announce(session, database_id)
        if result.rowcount != 1:
            raise Superseded(database_id)
        self._changed.notify()

    def _load(self, database_id: str) -> Database:
        with self.store.read() as session:
            record = session.get(Database, database_id)
        if record is None:
            raise Superseded(database_id)
        return record

    # -- provisioning -------------------------------------------------------

    def _provision(self, database_id: str) -> None:
        record = self._load(database_id)
        if record.status not in (Status.PENDING, Status.PROVISIONING):
            raise Superseded(database_id)
        if record.status == Status.PENDING:
            self._transition(database_id, (Status.PENDING,), status=Status.PROVISIONING)
            log.info("database %s: provisioning on port %s", database_id, record.host_port)
        timings: dict[str, float] = {}
        started = time.monotonic()
        try:
            record, container_id = self._ensure_container(record, timings)
            phase = time.monotonic()
            self._wait_ready(
                record,
                container_id,
                admin_login(record, self.vault, self.settings.effective_probe_host),
            )
            timings["ready"] = round(time.monotonic() - phase, 3)
            phase = time.monotonic()
            self._setup_tenant(record, container_id)
            timings["setup"] = round(time.monotonic() - phase, 3)
        except _NotReady as exc:
            self._fail(record, str(exc))
            return
        timings["total"] = round(time.monotonic() - started, 3)
        self._transition(
            database_id,
            (Status.PROVISIONING,),
            status=Status.READY,
            ready_at=record.ready_at or utcnow(),
            phase_timings=timings,
            last_error=None,
        )
        log.info(
            "database %s: ready on port %s (container %s, %.2f s)",
            database_id, record.host_port, container_id[:12], timings["total"],
        )

    def _ensure_container(
        self, record: Database, timings: dict[str, float]
    ) -> tuple[Database, str]:
        """Volume and container exist and the container runs.

        Returns the container's id and the record as it now is: its port may
        have moved.
        """
        labels = labels_for(self.settings.instance, record.id)
        phase = time.monotonic()
        if self._network_id is None:
            self._network_id = self.runtime.ensure_network(self.settings.network, self._labels)
        self.runtime.ensure_volume(volume_name(record.id), labels)
        for _ in range(_PORT_RETRIES):
            info = self.runtime.get_container(container_name(record.id))
            try:
                container_id = info.id if info else self.runtime.create_container(
                    self._spec(record, labels)
                )
            except ContainerRuntimeError:
                self._network_id = None  # see below: the network may be gone
                raise
            self._transition(
                record.id,
                (Status.PROVISIONING,),
                container_id=container_id,
                volume_name=volume_name(record.id),
            )
            timings["create"] = round(time.monotonic() - phase, 3)
            phase = time.monotonic()
            if info is not None and info.running:
                timings["start"] = 0.0
                return record, container_id
            try:
                self.runtime.start_container(container_id)
            except PortInUse as exc:
                # Something outside dbprov holds the port: move to another one.
                log.warning("database %s: port %s taken (%s); moving", record.id, record.host_port, exc)
                self.runtime.remove_container(container_id)
                record = self._move_port(record)
                phase = time.monotonic()
                continue
            except ContainerRuntimeError:
                # The engine reports a network removed behind our back only
                # here, at start: look the network up again, and make the
                # container anew on the next attempt (its data is on the volume).
                self._network_id = None
                self.runtime.remove_container(container_id)
                raise
            timings["start"] = round(time.monotonic() - phase, 3)
            return record, container_id
        raise _NotReady(f"no usable host port after {_PORT_RETRIES} attempts")

    def _spec(self, record: Database, labels: dict[str, str]) -> ContainerSpec:
        return ContainerSpec(
            name=container_name(record.id),
            image=record.image,
            # The container's superuser is the service's; the tenant's role is
            # made once the server is up (see _setup_tenant).
            environment={
                "POSTGRES_USER": record.admin_username,
                "POSTGRES_PASSWORD": self.vault.decrypt(record.admin_password),
                # No CREATE DATABASE at initialisation (it costs a noticeable
                # share of the start-up): the tenant's database is the initial
                # "postgres" one, renamed when the tenant's role is made.
                "POSTGRES_DB": "postgres",
            },
            command=["postgres", *self.settings.postgres_args],
            host_ip=self.settings.bind_address,
            host_port=record.host_port,
            volume=volume_name(record.id),
            labels=labels,
            network=self._network_id,
            memory_limit=self.settings.memory_limit,
            pids_limit=self.settings.pids_limit,
        )

    def _setup_tenant(self, record: Database, container_id: str) -> None:
        """The tenant's role, then the check that counts: ``SELECT 1`` as the tenant."""
        if record.tenant == POOL_TENANT:
            return  # a warm server gets its tenant's role when it is claimed
        try:
            set_up_tenant(self._server_admin, record, self.vault, self.settings.effective_probe_host)
        except psycopg.Error as exc:
            raise _NotReady(
                self._failure_text(container_id, "tenant role setup failed", _first_line(exc))
            ) from None

    def _move_port(self, record: Database) -> Database:
        with self.store.transaction() as session:
            port = pick_port(session, self.settings.port_range)
        self._transition(record.id, (Status.PROVISIONING,), host_port=port)
        return self._load(record.id)

    def _wait_ready(self, record: Database, container_id: str, login: Login) -> None:
        """Poll until ``login`` works over the published port."""
        deadline = time.monotonic() + self.settings.ready_timeout
        last_error = "no attempt made"
        next_status_check = time.monotonic() + 1.0
        next_inspect = 0.0
        while True:
            # The engine is asked less often than the server: each inspect
            # costs the engine CPU that the starting server would rather have.
            if time.monotonic() >= next_inspect:
                info = self.runtime.get_container(container_id)
                if info is None or info.crashed:
                    state = info.describe() if info else "vanished"
                    raise _NotReady(self._failure_text(container_id, f"container {state}", last_error))
                next_inspect = time.monotonic() + 0.25
            try:
                self._server_admin.check(login)
                return
            except psycopg.Error as exc:
                last_error = _first_line(exc)
            if time.monotonic() >= deadline:
                raise _NotReady(
                    self._failure_text(
                        container_id,
                        f"not ready within {self.settings.ready_timeout:g} s "
                        f"(container {info.describe()})",
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

    def _failure_text(self, container_id: str, what: str, last_error: str) -> str:
        logs = self.runtime.container_logs(container_id, tail=30).rstrip()
        return f"{what}; last connection error: {last_error}\ncontainer log (last lines):\n{logs}"

    def _fail(self, record: Database, error: str) -> None:
        """Record the failure and leave nothing running or holding a port.

        A database that was ready once keeps its volume: the data is the
        tenant's, and DELETE is what discards it.
        """
        self.runtime.remove_container(container_name(record.id))
        keep_volume = record.ready_at is not None
        if not keep_volume:
            self.runtime.remove_volume(volume_name(record.id))
        self._transition(
            record.id,
            (Status.PROVISIONING,),
            status=Status.FAILED,
            last_error=error,
            host_port=None,
            container_id=None,
            volume_name=volume_name(record.id) if keep_volume else None,
        )
        log.warning("database %s: failed: %s", record.id, error.splitlines()[0])

    # -- deletion -----------------------------------------------------------

    def _teardown(self, database_id: str) -> None:
        self.runtime.remove_container(container_name(database_id))
        self.runtime.remove_volume(volume_name(database_id))
        self._transition(
            database_id,
            (Status.DELETING,),
            status=Status.DELETED,
            deleted_at=utcnow(),
            host_port=None,
            container_id=None,
        )
        log.info("database %s: deleted", database_id)

    # -- drift --------------------------------------------------------------

    def _check_drift(self, record: Database, info: ContainerInfo | None) -> None:
        if info is None:
            log.warning("database %s: container vanished; recreating it on its volume", record.id)
            try:
                self._transition(record.id, (Status.READY,), status=Status.PROVISIONING)
            except Superseded:
                return
            self._submit(record.id, self._provision)
        elif info.state in ("exited", "dead", "created"):
            log.warning("database %s: container %s is %s; starting it", record.id, info.id[:12], info.state)
            try:
                self.runtime.start_container(info.id)
            except DbprovError as exc:
                log.warning("database %s: could not start container: %s", record.id, exc)

    def _sweep_orphans(
        self,
        records: list[Database],
        containers: dict[str | None, ContainerInfo],
        volumes: dict,
    ) -> None:
        owners = {r.id for r in records if r.status in _OWNS_CONTAINER}
        # A failed database that was ready once keeps its volume until DELETE.
        volume_owners = owners | {r.id for r in records if r.volume_name}
        with self._lock:
            busy = set(self._inflight)
        for database_id, info in containers.items():
            if database_id not in owners and database_id not in busy:
                log.warning("removing orphan container %s (%s)", info.name, info.id[:12])
                self.runtime.remove_container(info.id)
        for database_id, volume in volumes.items():
            if database_id not in volume_owners and database_id not in busy:
                log.warning("removing orphan volume %s", volume.name)
                self.runtime.remove_volume(volume.name)


def _first_line(exc: Exception) -> str:
    # The rest of a libpq message repeats host and port.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _NotReady(Exception):
    """Provisioning gave up; the message says why, with the container's log."""
