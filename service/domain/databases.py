"""The API's use cases: record wanted databases, read, change, stop, start,
rotate and delete them.

This layer owns the records' state and every decision about it; it never
changes the engine (it only reads a server's log). The reconciler makes the
engine follow what is recorded here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import ipaddress
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import psycopg
import sqlalchemy.exc
from sqlalchemy import Row, Select, bindparam, func, select, tuple_, update
from sqlalchemy.orm import Session

from ..errors import (
    Busy,
    Conflict,
    DatabaseServerError,
    Forbidden,
    NotFound,
    PortRangeExhausted,
    ValidationError,
)
from ..postgres.admin import TRUSTED_EXTENSIONS, ServerAdmin, admin_login
from ..runtime.protocol import ServerRuntime
from ..settings import Settings
from ..store.crypto import Vault
from ..store.engine import Store
from .images import Images
from .models import (
    COMING_UP,
    GOING,
    LIVE,
    OWNS_SERVER,
    Database,
    Event,
    IdempotencyKey,
    Snapshot,
    SnapshotStatus,
    Status,
    Template,
    utcnow,
)
from .parameters import check_values
from .ports import pick_port
from .records import Records
from .tenancy import POOL_TENANT, Principal, Tenants

if TYPE_CHECKING:
    from .pool import WarmPool
    from .snapshots import Snapshots
    from .templates import Templates

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ID_PATTERN = r"[0-9a-f]{12}"
# Each database has a server of its own, so fixed names inside it clash with nothing.
DATABASE_NAME = "app"
USERNAME = "app"
# The server's superuser, kept by the service.
ADMIN_USERNAME = "dbprov_admin"
# Concurrent creates may pick the same free port; the unique constraint lets
# one win and the others pick again.
_PORT_ATTEMPTS = 20


# Database-level settings a create may set (ALTER DATABASE ... SET): planner,
# memory, timeout and locale settings whose effect stays inside the database.
DATABASE_PARAMETERS = frozenset({
    "work_mem", "maintenance_work_mem", "temp_buffers", "statement_timeout", "lock_timeout",
    "idle_in_transaction_session_timeout", "idle_session_timeout", "search_path", "timezone",
    "datestyle", "intervalstyle", "default_transaction_isolation", "default_transaction_read_only",
    "random_page_cost", "seq_page_cost", "effective_cache_size", "effective_io_concurrency",
    "default_statistics_target", "jit", "synchronous_commit", "log_min_duration_statement",
})
# Statuses a DELETE, or a change of expiry or protection, still applies to.
_CHANGEABLE = LIVE - {Status.DELETING}


def _snapshotting(database_id: str) -> Busy:
    return Busy(
        f"database {database_id} is being snapshotted (its server stops for a moment); "
        "the password was not changed: try again shortly"
    )


def new_password() -> str:
    # URL-safe, so the URI needs no escaping in any client.
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Wanted:
    """What a create asks for, checked."""

    version: str
    name: str | None = None
    superuser: bool = False
    expires_at: datetime | None = None
    protected: bool = False
    plan: str = "default"
    parameters: Mapping[str, str] = field(default_factory=dict)
    extensions: tuple[str, ...] = ()
    # The snapshot its data is copied from, and the template it is a clone of.
    source: "Snapshot | None" = None
    template_id: str | None = None
    # Or a database of which a snapshot is taken along with the record.
    copy_of: Database | None = None

    @property
    def plain(self) -> bool:
        """What a warm pool member is, or can be made into at its claim."""
        return self.plan == "default" and self.copy_of is None and (
            self.source is None or self.template_id is not None
        )

    def columns(self) -> dict[str, Any]:
        """The record's columns this request decides."""
        return {
            "name": self.name, "superuser": self.superuser, "expires_at": self.expires_at,
            "protected": self.protected, "plan": self.plan,
            "parameters": dict(self.parameters), "extensions": list(self.extensions),
            "source_snapshot_id": self.source.id if self.source else None,
            "template_id": self.template_id,
        }


@dataclass(frozen=True)
class Idempotency:
    """A create's Idempotency-Key and the hash of its body."""

    key: str
    request_hash: str


# What a listed database shows: the list reads these columns, not whole
# records. Hydrating 50 records (secrets, retry state and all) as ORM objects
# took most of a page's time.
LISTED = (
    Database.id, Database.tenant, Database.name, Database.status, Database.version, Database.image,
    Database.host_port, Database.database_name, Database.username, Database.superuser,
    Database.expires_at, Database.protected, Database.plan, Database.parameters, Database.extensions,
    Database.source_snapshot_id, Database.last_error, Database.phase_timings, Database.created_at,
    Database.ready_at, Database.deleted_at, Database.server_host,
)

# Built once: a select of 22 columns costs more to make than to run.
_LISTING = select(*LISTED)
_SHOWING = _LISTING.where(Database.id == bindparam("id"))


@functools.cache
def _page_statements(admin: bool, by_status: bool, after: bool) -> tuple[Select, Select]:
    """A page of the list (with its total riding along on each row) and the
    total alone, for a tenant or an admin, of one status or all, after a
    cursor or at an offset: built once per shape (building them anew was
    about a quarter of a page's time)."""
    # A tenant's own condition keeps the pool out already (no token names
    # it), and a second condition on every row costs a third of the count.
    conditions = [Database.tenant != POOL_TENANT if admin else Database.tenant == bindparam("tenant")]
    if by_status:
        conditions.append(Database.status == bindparam("status"))
    # Counted on the index, not over a subquery of whole rows.
    count = select(func.count()).select_from(Database).where(*conditions)
    # The total rides along with each row (the subquery is computed once):
    # a page is one statement, and its total and items are of one moment.
    ordered = (
        _LISTING.add_columns(count.scalar_subquery().label("total")).where(*conditions)
        .order_by(Database.created_at.desc(), Database.id.desc()).limit(bindparam("limit"))
    )
    if after:
        last = tuple_(
            bindparam("after_created_at", type_=Database.created_at.type),
            bindparam("after_id", type_=Database.id.type),
        )
        return ordered.where(tuple_(Database.created_at, Database.id) < last), count
    return ordered.offset(bindparam("offset")), count


@dataclass(frozen=True)
class Page:
    # Rows with the LISTED columns, named as a Database's attributes.
    items: list[Row]
    page: int
    page_size: int
    total: int
    # Where the next page starts; None on the last one.
    next_cursor: str | None = None


def _encode_cursor(record: Row) -> str:
    raw = f"{record.created_at.isoformat()}|{record.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, database_id = raw.split("|", 1)
        moment = datetime.fromisoformat(created_at)
        if moment.tzinfo is None or not re.fullmatch(ID_PATTERN, database_id):
            raise ValueError(raw)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ValidationError(
            "the cursor is not one this service gave out",
            errors={"query": {"cursor": ["Not a cursor from next_cursor."]}},
        ) from None
    return moment, database_id


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


def _invalid(field_name: str, detail: str, message: str) -> ValidationError:
    return ValidationError(detail, errors={"json": {field_name: [message]}})


def _only(field_name: str, asked, allowed: frozenset[str] | set[str], why: str) -> None:
    """Refuse the first of ``asked`` that is not ``allowed``, naming it."""
    for name in asked:
        if name not in allowed:
            raise _invalid(
                field_name, f"{field_name}: {name!r} is not allowed",
                f"{name}: {why}; allowed: {', '.join(sorted(allowed))}.",
            )


def _check_id(database_id: str) -> None:
    # Anything else cannot exist; refusing it here keeps odd bytes (NUL, say)
    # away from the metadata store's driver.
    if not re.fullmatch(ID_PATTERN, database_id):
        raise NotFound(f"no database with id {database_id!r}")


def _visible(principal: Principal, database_id: str, record: Database | Row | None) -> Database | Row:
    # Another tenant's database looks exactly like one that does not exist.
    if record is None or not principal.sees(record) or record.tenant == POOL_TENANT:
        raise NotFound(f"no database with id {database_id!r}")
    return record


class Databases:
    """The domain service behind the HTTP views."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        records: Records,
        vault: Vault,
        tenants: Tenants,
        server_admin: ServerAdmin,
        images: Images,
        runtime: ServerRuntime,
    ) -> None:
        self.settings = settings
        self.store = store
        self.records = records
        self.vault = vault
        self.tenants = tenants
        self.server_admin = server_admin
        self.images = images
        self.runtime = runtime
        # Set by the composition root: warm servers (when DBPROV_POOL_SIZE asks
        # for them), and where clones come from.
        self.pool: WarmPool | None = None
        self.snapshots: Snapshots | None = None
        self.templates: Templates | None = None

    def create(
        self,
        principal: Principal,
        name: str | None = None,
        version: str | None = None,
        superuser: bool = False,
        *,
        ttl: float | None = None,
        expires_at: datetime | None = None,
        protected: bool = False,
        plan: str | None = None,
        parameters: Mapping[str, str] | None = None,
        extensions: list[str] | None = None,
        from_snapshot: str | None = None,
        from_database: str | None = None,
        template: str | None = None,
        idempotency: Idempotency | None = None,
    ) -> Database:
        """A warm pool member made the tenant's, or else a new record with its port
        reserved, which the reconciler starts. A clone's data is a copy of a
        snapshot, of another database, or of a template. With ``idempotency``,
        a create already made with the same key answers again instead."""
        if idempotency is not None:
            earlier = self._replay(principal, idempotency)
            if earlier is not None:
                return earlier
        source, template_id, original = self._source(principal, from_snapshot, from_database, template)
        copied = source or original
        if copied is not None:
            if version is not None and version != copied.version:
                raise _invalid("version", f"the copy is of version {copied.version}, not {version}",
                               f"Must be {copied.version}, the version of the copy, or left out.")
            version = copied.version
        wanted = self._check(principal, name, version, superuser, ttl, expires_at, protected, plan,
                             parameters or {}, extensions or [])
        wanted = dataclasses.replace(wanted, source=source, template_id=template_id, copy_of=original)
        # Before anything is recorded: a version that cannot run holds no record and no port.
        self.images.require(wanted.version)
        try:
            if self.pool is not None and wanted.plain:
                claimed = self.pool.claim(principal, wanted, idempotency)
                if claimed is not None:
                    return claimed
            return self.record(principal.tenant, wanted, self.vault.encrypt(new_password()), principal.actor,
                               idempotency, admin=principal.admin)
        except sqlalchemy.exc.IntegrityError:
            # Only the key can still collide here: a retry of the same create
            # committed first. Answer as it did.
            earlier = self._replay(principal, idempotency) if idempotency else None
            if earlier is None:
                raise
            return earlier

    def _source(
        self, principal: Principal, from_snapshot: str | None, from_database: str | None, template: str | None
    ) -> "tuple[Snapshot | None, str | None, Database | None]":
        """What a clone copies: a ready snapshot and its template, or a database
        to take a snapshot of; nothing for a fresh database."""
        asked = [name for name, value in (("from_snapshot", from_snapshot), ("from_database", from_database),
                                          ("template", template)) if value is not None]
        if len(asked) > 1:
            raise _invalid(asked[1], f"give one of {', '.join(asked)}", "Give only one source.")
        if template is not None:
            usable = self.templates.usable(principal, template)
            return self.snapshots.get(principal, usable.snapshot_id, usable=True), usable.id, None
        if from_snapshot is not None:
            return self.snapshots.get(principal, from_snapshot, usable=True), None, None
        if from_database is not None:
            return None, None, self.snapshots.of(principal, from_database)
        return None, None, None

    def _check(
        self, principal: Principal, name: str | None, version: str | None, superuser: bool,
        ttl: float | None, expires_at: datetime | None, protected: bool, plan: str | None,
        parameters: Mapping[str, str], extensions: list[str],
    ) -> Wanted:
        """Refuse what the service does not offer, naming the field; nothing is recorded."""
        version = version or self.settings.default_version
        if version not in self.settings.images:
            raise _invalid("version", f"unsupported version {version!r}; supported: "
                           f"{', '.join(self.settings.images)}",
                           f"Must be one of: {', '.join(self.settings.images)}.")
        if name is not None and not re.fullmatch(NAME_PATTERN, name):
            raise _invalid("name", "invalid name", f"Must match {NAME_PATTERN}.")
        if superuser and not self.settings.allow_superuser:
            raise Forbidden("this service does not hand out superuser roles (DBPROV_ALLOW_SUPERUSER)")
        plan = plan or "default"
        if plan not in self.settings.all_plans:
            raise _invalid("plan", f"no plan {plan!r}; plans: {', '.join(self.settings.all_plans)}",
                           f"Must be one of: {', '.join(self.settings.all_plans)}.")
        _only("parameters", parameters, DATABASE_PARAMETERS, "not a database-level setting this service allows")
        check_values(version, dict(parameters))
        _only(
            "extensions", extensions, TRUSTED_EXTENSIONS | set(self.settings.allowed_extensions),
            "neither trusted nor allowed by DBPROV_ALLOWED_EXTENSIONS",
        )
        return Wanted(
            version=version, name=name, superuser=superuser,
            expires_at=self._expiry(ttl, expires_at, default=True), protected=protected, plan=plan,
            parameters=dict(parameters), extensions=tuple(dict.fromkeys(extensions)),
        )

    def _expiry(self, ttl: float | None, expires_at: datetime | None, default: bool) -> datetime | None:
        """When a database asked to live ``ttl`` seconds, or until ``expires_at``, expires."""
        if ttl is not None and expires_at is not None:
            raise _invalid("ttl", "give ttl or expires_at, not both", "Give ttl or expires_at, not both.")
        now = utcnow()
        if ttl is not None:
            expires = now + timedelta(seconds=ttl)
        elif expires_at is not None:
            if expires_at <= now:
                raise _invalid("expires_at", "expires_at is in the past", "Must be in the future.")
            expires = expires_at
        elif default and (self.settings.default_ttl or self.settings.max_ttl):
            expires = now + timedelta(seconds=self.settings.default_ttl or self.settings.max_ttl)
        else:
            return None
        limit = self.settings.max_ttl
        if limit is not None and expires > now + timedelta(seconds=limit):
            raise _invalid("ttl", f"the expiry is more than DBPROV_MAX_TTL ({limit:g} s) away",
                           f"At most {limit:g} seconds from now.")
        return expires

    def record(
        self, tenant: str, wanted: Wanted, password: str, actor: str,
        idempotency: Idempotency | None = None, not_before: datetime | None = None, admin: bool = False,
    ) -> Database:
        """A new pending record with a host port reserved for it, provisioned
        from ``not_before`` on (at once without it). It counts against its
        tenant's limits (see ``Tenants.reserve``); a warm clone of a template
        against the template's tenant's."""
        # A copy's server keeps the superuser its data already has.
        copied = wanted.source or wanted.copy_of
        admin_username = copied.admin_username if copied else ADMIN_USERNAME
        admin_password = copied.admin_password if copied else self.vault.encrypt(new_password())
        for _ in range(_PORT_ATTEMPTS):
            try:
                with self.store.transaction() as session:
                    charged = tenant
                    if tenant == POOL_TENANT:
                        # The plain pool is nobody's; a template's clones wait for its tenant alone.
                        charged = wanted.template_id and session.scalar(
                            select(Template.tenant).where(Template.id == wanted.template_id)
                        )
                    if charged:
                        self.tenants.reserve(session, charged, wanted.plan, admin=admin)
                    if wanted.name is not None:
                        self.ensure_name_free(session, tenant, wanted.name)
                    columns = wanted.columns()
                    database_id = secrets.token_hex(6)  # matches ID_PATTERN
                    if wanted.copy_of is not None:
                        # A consistent copy first, which the clone's provisioning
                        # waits for; the clone's own, to reset to while it lives.
                        columns["source_snapshot_id"] = self.snapshots.add(
                            session, wanted.copy_of, actor, owner_id=database_id
                        ).id
                    record = Database(
                        id=database_id,
                        tenant=tenant,
                        status=Status.PENDING,
                        version=wanted.version,
                        image=self.settings.images[wanted.version],
                        host_port=pick_port(session, self.settings.port_range),
                        database_name=DATABASE_NAME,
                        username=USERNAME,
                        password=password,
                        admin_username=admin_username,
                        admin_password=admin_password,
                        phase_timings={},
                        next_attempt_at=not_before,
                        **columns,
                    )
                    self.records.add(session, record, actor)
                    if idempotency is not None:
                        self.remember(session, tenant, idempotency, record.id)
            except sqlalchemy.exc.IntegrityError:
                if idempotency is not None and self._key_taken(tenant, idempotency):
                    raise
                # Lost a race for the port or the name; the next round sees the winner.
                continue
            log.info(
                "database %s recorded for tenant %s: version %s, port %s",
                record.id, record.tenant, wanted.version, record.host_port,
            )
            return record
        raise PortRangeExhausted("could not reserve a host port; try again")

    def remember(self, session: Session, tenant: str, idempotency: Idempotency, database_id: str) -> None:
        """Keep the key with the database it made, in the create's transaction."""
        session.add(IdempotencyKey(
            tenant=tenant, key=idempotency.key, request_hash=idempotency.request_hash,
            database_id=database_id, created_at=utcnow(),
        ))

    def _key_taken(self, tenant: str, idempotency: Idempotency) -> bool:
        with self.store.read() as session:
            return session.get(IdempotencyKey, (tenant, idempotency.key)) is not None

    def _replay(self, principal: Principal, idempotency: Idempotency) -> Database | None:
        """The database an earlier create with this key made, or None if there was none."""
        cutoff = utcnow() - timedelta(seconds=self.settings.idempotency_retention)
        with self.store.transaction() as session:
            known = session.get(IdempotencyKey, (principal.tenant, idempotency.key))
            if known is None:
                return None
            if known.created_at < cutoff:
                # Past its retention: the key is free again.
                session.delete(known)
                return None
            if known.request_hash != idempotency.request_hash:
                raise ValidationError(
                    "this Idempotency-Key was used with a different request body; "
                    "use a new key for a new request",
                    errors={"headers": {"Idempotency-Key": ["Used with a different body."]}},
                )
            database_id = known.database_id
        return self.get(principal, database_id)

    def ensure_name_free(self, session: Session, tenant: str, name: str) -> None:
        taken = session.scalar(
            select(Database.id).where(
                Database.tenant == tenant, Database.name == name, Database.status != Status.DELETED
            )
        )
        if taken is not None:
            raise Conflict(f"a database named {name!r} already exists", database_id=taken)

    def get(self, principal: Principal, database_id: str) -> Database:
        _check_id(database_id)
        with self.store.lookup() as connection, Session(connection) as session:
            record = session.get(Database, database_id)
        return _visible(principal, database_id, record)

    def show(self, principal: Principal, database_id: str) -> Row:
        """A database's LISTED columns, as a page of the list has them: what
        ``GET /databases/{id}`` shows, read without loading a whole record."""
        _check_id(database_id)
        with self.store.lookup() as connection:
            row = connection.execute(_SHOWING, {"id": database_id}).first()
        return _visible(principal, database_id, row)

    def list(
        self,
        principal: Principal,
        status: Status | None = None,
        page: int = 1,
        page_size: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """Newest first. ``cursor`` (from a page's ``next_cursor``) continues after
        that page's last item without counting past the earlier ones, as an
        offset would; ``page`` stays for clients that number pages."""
        ordered, count = _page_statements(principal.admin, status is not None, cursor is not None)
        params: dict[str, Any] = {"tenant": principal.tenant, "status": status, "limit": page_size}
        if cursor is not None:
            params["after_created_at"], params["after_id"] = _decode_cursor(cursor)
        else:
            params["offset"] = (page - 1) * page_size
        with self.store.lookup() as connection:
            items = connection.execute(ordered, params).all()
            # Past the end there is no row to carry it.
            total = items[0].total if items else connection.scalar(count, params)
        next_cursor = _encode_cursor(items[-1]) if len(items) == page_size else None
        return Page(items=items, page=page, page_size=page_size, total=total, next_cursor=next_cursor)

    def delete(self, principal: Principal, database_id: str) -> Database:
        """Mark a database for removal; repeating it changes nothing."""
        record = self.get(principal, database_id)
        changed = self.records.transition(
            database_id, _CHANGEABLE, only_if=Database.protected.is_(False),
            actor=principal.actor, status=Status.DELETING,
        )
        if changed is None:
            record = self.get(principal, database_id)
            if record.protected and record.status not in GOING:
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
        """Change a database's expiry (``ttl`` or ``expires_at``, None to remove it) or protection."""
        self.get(principal, database_id)
        values: dict[str, Any] = {}
        if "ttl" in changes or "expires_at" in changes:
            expires = self._expiry(changes.get("ttl"), changes.get("expires_at"), default=False)
            if expires is None and self.settings.max_ttl is not None:
                raise Forbidden(
                    f"every database here expires within DBPROV_MAX_TTL ({self.settings.max_ttl:g} s); "
                    "renew it with a ttl instead"
                )
            values["expires_at"] = expires
        if "protected" in changes:
            values["protected"] = changes["protected"]
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
        return self._move(principal, database_id, Status.READY, Status.STOPPING, "stopped")

    def start(self, principal: Principal, database_id: str) -> Database:
        """Start a stopped database again on the same port and password; or a
        failed one whose data was kept (it was ready once), on a port picked
        anew (a failure gave its port back)."""
        record = self.get(principal, database_id)
        if record.status != Status.FAILED:
            return self._move(principal, database_id, Status.STOPPED, Status.STARTING, "started")
        if record.ready_at is None:
            raise Conflict(f"database {database_id} failed before it held any data: delete it and create another")
        for _ in range(_PORT_ATTEMPTS):
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

    def _move(
        self, principal: Principal, database_id: str, source: Status, target: Status, verb: str
    ) -> Database:
        self.get(principal, database_id)
        changed = self.records.transition(database_id, {source}, actor=principal.actor, status=target)
        if changed is None:
            record = self.get(principal, database_id)
            raise Conflict(
                f"database {database_id} is {record.status.value}; only a {source.value} database "
                f"can be {verb}"
            )
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
