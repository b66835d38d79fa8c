"""The API's use cases: record wanted databases, read, change, stop, start,
rotate and delete them.

This layer owns the records' state and every decision about it; it never
changes the engine (it only reads a server's log). The reconciler makes the
engine follow what is recorded here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import psycopg
import sqlalchemy.exc
from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from ..errors import Busy, Conflict, DatabaseServerError, Forbidden, NotFound, PortRangeExhausted
from ..postgres.admin import ServerAdmin, admin_login
from ..runtime.protocol import ServerRuntime
from ..settings import Settings
from ..store.crypto import Vault
from ..store.engine import Store
from .images import Images
from .models import (
    COMING_UP,
    DELETING_OR_DELETED,
    NOT_DELETED,
    OWNS_SERVER,
    Database,
    Event,
    Snapshot,
    SnapshotStatus,
    Status,
    utcnow,
)
from .pool import WarmPool
from .ports import pick_port
from .records import Records
from .registry import PORT_ATTEMPTS, Page, Registry, new_password
from .requests import CreateRequest, Idempotency, check, expiry, invalid
from .snapshots import Snapshots
from .templates import Templates
from .tenancy import POOL_TENANT, Principal

log = logging.getLogger(__name__)

# Statuses a DELETE, or a change of expiry or protection, still applies to.
_CHANGEABLE = NOT_DELETED - {Status.DELETING}


def _snapshotting(database_id: str) -> Busy:
    return Busy(
        f"database {database_id} is being snapshotted (its server stops for a moment); "
        "the password was not changed: try again shortly"
    )


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    database: str
    host: str
    port: int | None
    # What the URI asks of TLS; None: libpq's default (prefer).
    sslmode: str | None = None

    @property
    def connection_uri(self) -> str | None:
        if self.port is None:
            return None
        return (
            f"postgresql://{quote(self.username, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}"
            + (f"?sslmode={self.sslmode}" if self.sslmode else "")
        )

    def __repr__(self) -> str:
        return f"Credentials({self.username}@{self.host}:{self.port}/{self.database})"


class Databases:
    """The domain service behind the HTTP views: a create's orchestration
    (warm pool, clone sources, or a new record), and a database's life."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        records: Records,
        vault: Vault,
        registry: Registry,
        server_admin: ServerAdmin,
        images: Images,
        runtime: ServerRuntime,
        snapshots: Snapshots,
        templates: Templates,
        pool: WarmPool,
    ) -> None:
        self.settings = settings
        self.store = store
        self.records = records
        self.vault = vault
        self.registry = registry
        self.server_admin = server_admin
        self.images = images
        self.runtime = runtime
        self.snapshots = snapshots
        self.templates = templates
        # Warm servers: a version's (DBPROV_POOL_SIZE) and templates' own.
        self.pool = pool

    def create(
        self, principal: Principal, request: CreateRequest = CreateRequest(),
        idempotency: Idempotency | None = None,
    ) -> Database:
        """A warm pool member made the tenant's, or else a new record with its port
        reserved, which the reconciler starts. A clone's data is a copy of a
        snapshot, of another database, or of a template. With ``idempotency``,
        a create already made with the same key answers again instead."""
        if idempotency is not None:
            earlier = self.registry.replay(principal, idempotency)
            if earlier is not None:
                return earlier
        source, template_id, original = self._source(principal, request)
        version = request.version
        copied = source or original
        if copied is not None:
            if version is not None and version != copied.version:
                raise invalid("version", f"the copy is of version {copied.version}, not {version}",
                              f"Must be {copied.version}, the version of the copy, or left out.")
            version = copied.version
        new = dataclasses.replace(
            check(self.settings, request, version), source=source, template_id=template_id, copy_of=original
        )
        # Before anything is recorded: a version that cannot run holds no record and no port.
        self.images.require(new.version)
        try:
            if new.poolable:
                claimed = self.pool.claim(principal, new, idempotency)
                if claimed is not None:
                    return claimed
            if copied is not None:
                # A warm clone is made already; this one copies data.
                self.snapshots.check_room("a clone")
            password = self.vault.encrypt(new_password())
            return self.registry.add(principal.tenant, new, password, principal.actor, idempotency,
                                     admin=principal.admin)
        except sqlalchemy.exc.IntegrityError:
            # Only the key can still collide here: a retry of the same create
            # committed first. Answer as it did.
            earlier = self.registry.replay(principal, idempotency) if idempotency else None
            if earlier is None:
                raise
            return earlier

    def _source(
        self, principal: Principal, request: CreateRequest
    ) -> tuple[Snapshot | None, str | None, Database | None]:
        """What a clone copies: a ready snapshot and its template, or a database
        to take a snapshot of; nothing for a fresh database."""
        asked = request.sources
        if len(asked) > 1:
            raise invalid(asked[1], f"give one of {', '.join(asked)}", "Give only one source.")
        if request.template is not None:
            usable = self.templates.usable(principal, request.template)
            return self.snapshots.get(principal, usable.snapshot_id, usable=True), usable.id, None
        if request.from_snapshot is not None:
            return self.snapshots.get(principal, request.from_snapshot, usable=True), None, None
        if request.from_database is not None:
            return None, None, self.snapshots.ready_for_snapshot(principal, request.from_database)
        return None, None, None

    def get(self, principal: Principal, database_id: str) -> Database:
        return self.registry.get(principal, database_id)

    def show(self, principal: Principal, database_id: str) -> Row:
        return self.registry.show(principal, database_id)

    def list(
        self, principal: Principal, status: Status | None = None, page: int = 1, page_size: int = 50,
        cursor: str | None = None,
    ) -> Page:
        return self.registry.list(principal, status, page, page_size, cursor)

    def delete(self, principal: Principal, database_id: str) -> Database:
        """Mark a database for removal; repeating it changes nothing."""
        record = self.get(principal, database_id)
        changed = self.records.transition(
            database_id, _CHANGEABLE, only_if=Database.protected.is_(False),
            actor=principal.actor, status=Status.DELETING,
        )
        if changed is None:
            record = self.get(principal, database_id)
            if record.protected and record.status not in DELETING_OR_DELETED:
                raise Conflict(
                    f"database {database_id} is protected; lift the protection with "
                    f'PATCH /databases/{database_id} {{"protected": false}} first'
                )
            return record
        log.info("database %s: deletion requested", database_id)
        return changed

    def update(
        self, principal: Principal, database_id: str, changes: Mapping[str, Any]
    ) -> Database:
        """Change a database's expiry (``ttl`` or ``expires_at``, None to remove it), protection
        or ``idle_stop`` (None: it never sleeps)."""
        self.get(principal, database_id)
        values: dict[str, Any] = {}
        if "ttl" in changes or "expires_at" in changes:
            expires = expiry(self.settings, changes.get("ttl"), changes.get("expires_at"), default=False)
            if expires is None and self.settings.max_ttl is not None:
                raise Forbidden(
                    f"every database here expires within DBPROV_MAX_TTL ({self.settings.max_ttl:g} s); "
                    "renew it with a ttl instead"
                )
            values["expires_at"] = expires
        if "protected" in changes:
            values["protected"] = changes["protected"]
        if "idle_stop" in changes:
            values["idle_stop"] = changes["idle_stop"]
        if not values:
            return self.get(principal, database_id)
        details = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values.items()}
        changed = self.records.transition(
            database_id, _CHANGEABLE, actor=principal.actor, event="updated", details=details, **values
        )
        if changed is None:
            record = self.get(principal, database_id)
            raise Conflict(f"database {database_id} is {record.status.value}; it can no longer change")
        return changed

    def stop(self, principal: Principal, database_id: str) -> Database:
        """Stop a ready database's server, keeping its data and port."""
        return self._request_move(principal, database_id, {Status.READY, Status.SLEEPING}, Status.STOPPING, "stopped")

    def start(self, principal: Principal, database_id: str) -> Database:
        """Start a stopped database again on the same port and password; or a
        failed one whose data was kept (it was ready once), on a port picked
        anew (a failure gave its port back)."""
        record = self.get(principal, database_id)
        if record.status == Status.WAKING:
            return record  # a connection woke it already: the same start
        if record.status == Status.SLEEPING:
            # Woken as a connection would: one wake, whichever comes first.
            changed = self.records.transition(database_id, {Status.SLEEPING}, actor=principal.actor,
                                              status=Status.WAKING)
            return changed or self.start(principal, database_id)
        if record.status != Status.FAILED:
            return self._request_move(principal, database_id, {Status.STOPPED}, Status.STARTING, "started")
        if record.ready_at is None:
            raise Conflict(f"database {database_id} failed before it held any data: delete it and create another")
        for _ in range(PORT_ATTEMPTS):
            try:
                with self.store.transaction() as session:
                    changed = self.records.transition(
                        database_id, {Status.FAILED}, session=session, actor=principal.actor,
                        only_if=Database.ready_at.is_not(None), status=Status.STARTING,
                        host_port=pick_port(session, self.settings.port_range),
                        attempts=0, next_attempt_at=None, retrying_since=None,
                    )
            except sqlalchemy.exc.IntegrityError:
                continue  # another create took the port first: pick again
            if changed is None:
                raise Conflict(f"database {database_id} changed meanwhile; ask again")
            log.info("database %s: start of a failed database requested", database_id)
            return changed
        raise PortRangeExhausted("no free host port after several attempts; try again")

    def _request_move(
        self, principal: Principal, database_id: str, sources: set[Status], target: Status, verb: str
    ) -> Database:
        self.get(principal, database_id)
        changed = self.records.transition(database_id, sources, actor=principal.actor, status=target)
        if changed is None:
            record = self.get(principal, database_id)
            allowed = " or ".join(sorted(source.value for source in sources))
            raise Conflict(f"database {database_id} is {record.status.value}; only a {allowed} database can be {verb}")
        log.info("database %s: %s requested", database_id, target.value)
        return changed

    def events(
        self,
        principal: Principal,
        database_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        latest: bool = False,
    ) -> list[Event]:
        """A database's events in order, the first ``limit`` of them or with
        ``latest`` the last; without ``database_id``, every tenant's (admins only)."""
        query = select(Event)
        if database_id is not None:
            record = self.get(principal, database_id)
            # From its tenant's point of view: a claimed warm server's life in
            # the pool is the service's business.
            query = query.where(Event.database_id == database_id, Event.tenant == record.tenant)
        elif not principal.admin:
            raise Forbidden("only an admin token reads events across databases")
        else:
            query = query.where(Event.tenant != POOL_TENANT)
        if since is not None:
            query = query.where(Event.at >= since)
        if until is not None:
            query = query.where(Event.at < until)
        with self.store.read() as session:
            if latest:
                return list(reversed(session.scalars(query.order_by(Event.id.desc()).limit(limit)).all()))
            return list(session.scalars(query.order_by(Event.id).limit(limit)))

    def logs(self, principal: Principal, database_id: str, tail: int) -> str:
        """The last ``tail`` lines of the server's log, as long as anything of it remains."""
        record = self.get(principal, database_id)
        if record.status in OWNS_SERVER:
            return self.runtime.server_logs(database_id, tail)
        # A failed server was removed; its last lines were kept with the failure.
        marker = "server log (last lines):\n"
        if record.last_error and marker in record.last_error:
            lines = record.last_error.split(marker, 1)[1].splitlines()
            return "\n".join(lines[-tail:]) + "\n"
        raise NotFound(f"nothing is left of the log of database {database_id}")

    def host(self, record: Database) -> str:
        """The host clients connect to.

        On Swarm a server answers on its own node: at that node's public name
        or address, as the runtime said (``server_host``). On one engine the
        address the service reaches it at may be one clients cannot use
        (``host.docker.internal``), so DBPROV_PUBLIC_HOST names it.
        """
        if self.settings.runtime == "swarm" and record.server_host:
            return record.server_host
        return self.settings.public_host

    def live_credentials(self, principal: Principal, database_id: str) -> Credentials:
        """What a client needs to connect, while there is a server to connect to."""
        record = self.get(principal, database_id)
        if record.status == Status.DELETED:
            # Its server and role are gone: a password for nothing, and still a secret.
            raise NotFound(f"database {database_id} is deleted: it has no credentials any more")
        return self.credentials(record)

    def credentials(self, record: Database) -> Credentials:
        return Credentials(
            username=record.username,
            password=self.vault.decrypt(record.password),
            database=record.database_name,
            host=self.host(record),
            port=record.host_port,
            # Published beyond this machine, a client must not settle for
            # plain text; but a server made before the service had a CA has
            # no certificate, and would refuse such a client.
            sslmode="require" if record.tls and self._published else None,
        )

    @property
    def _published(self) -> bool:
        """Whether clients reach servers from other machines, as on Swarm or
        with a DBPROV_PUBLIC_HOST that is not a loopback name."""
        if self.settings.runtime == "swarm":
            return True
        host = self.settings.public_host.strip("[]")
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host.lower() != "localhost"

    def rotate_password(self, principal: Principal, database_id: str) -> tuple[Database, Credentials]:
        """A new password that works at once; the old one stops working.

        In three steps, so that the store and the server agree whatever ends
        when: the new password is kept as pending, set on the server (outside
        any metadata transaction: a tenant's lock in its way holds up nobody
        else), then made the password. If the process ends after the server
        took it, the reconciler finishes the rotation (``Records.finish_rotation``).
        """
        self.get(principal, database_id)
        password = new_password()
        pending = self.vault.encrypt(password)
        with self.store.transaction() as session:
            # The row lock keeps a second rotation, or a delete, from interleaving.
            record = session.scalar(
                select(Database).where(Database.id == database_id).with_for_update()
            )
            if record.status != Status.READY:
                raise Conflict(f"database {database_id} is {record.status.value}, not ready")
            if self._snapshot_pending(session, database_id):
                raise _snapshotting(database_id)
            if record.pending_password is not None:
                raise Busy(f"a rotation of database {database_id}'s password is under way; try again shortly")
            record.pending_password, record.pending_since = pending, utcnow()
            login, username = admin_login(record, self.vault), record.username
        try:
            self.server_admin.set_password(login, username, password)
        except psycopg.Error as exc:
            # Refused: the stored password is still the working one.
            with self.store.transaction() as session:
                session.execute(
                    update(Database).where(Database.id == database_id, Database.pending_password == pending)
                    .values(pending_password=None, pending_since=None)
                )
                # A snapshot asked for meanwhile stops the server for a moment:
                # that is worth another try shortly, not a server error.
                if self._snapshot_pending(session, database_id):
                    raise _snapshotting(database_id) from None
            # Only the class: a server message might echo the statement.
            raise DatabaseServerError(
                f"the database server did not take the new password ({type(exc).__name__}); "
                "the old one still works"
            ) from None
        record = self.records.finish_rotation(database_id, pending, principal.actor)
        if record is None:
            raise Conflict(f"database {database_id} changed while its password was rotated; ask again")
        log.info("database %s: password rotated", database_id)
        return record, self.credentials(record)

    @staticmethod
    def _snapshot_pending(session: Session, database_id: str) -> bool:
        return session.scalar(
            select(Snapshot.id).where(Snapshot.database_id == database_id, Snapshot.status == SnapshotStatus.PENDING)
            .limit(1)
        ) is not None

    def wait_until_settled(self, principal: Principal, database_id: str, timeout: float) -> Database:
        """The record once it is ready or failed, or as it is when ``timeout`` runs out."""
        return self.records.wait(
            lambda: self.get(principal, database_id), lambda r: r.status in COMING_UP, timeout
        )
