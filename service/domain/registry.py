"""The database rows: added with a port and a name, found by id for a
principal, listed a page at a time; the idempotency keys of the creates that
made them, and the snapshot rows taken along with a clone.

The use cases above it (``databases``, ``pool``, ``snapshots``,
``templates``) share this; it knows none of them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Row, Select, bindparam, func, select, tuple_
from sqlalchemy.orm import Session

from ..errors import Conflict, NotFound, PortRangeExhausted, QuotaExceeded, ValidationError
from ..settings import Settings
from ..store.crypto import Vault
from ..store.engine import Store
from .models import (
    SNAPSHOT_SOURCES,
    Database,
    IdempotencyKey,
    Snapshot,
    SnapshotStatus,
    Status,
    Template,
    utcnow,
)
from .ports import pick_port
from .records import Records
from .requests import Idempotency, NewDatabase
from .tenancy import POOL_TENANT, Principal, Tenants

log = logging.getLogger(__name__)

ID_PATTERN = r"[0-9a-f]{12}"
# Each database has a server of its own, so fixed names inside it clash with nothing.
DATABASE_NAME = "app"
USERNAME = "app"
# The server's superuser, kept by the service.
ADMIN_USERNAME = "dbprov_admin"
# Concurrent creates may pick the same free port; the unique constraint lets
# one win and the others pick again.
PORT_ATTEMPTS = 20


def new_password() -> str:
    # URL-safe, so the URI needs no escaping in any client.
    return secrets.token_urlsafe(24)


# What a listed database shows: the list reads these columns, not whole
# records, whose hydration as ORM objects (secrets, retry state and all)
# would be most of a page's time.
LISTED = (
    Database.id, Database.tenant, Database.name, Database.status, Database.version, Database.image,
    Database.host_port, Database.database_name, Database.username, Database.superuser,
    Database.durable, Database.expires_at, Database.protected, Database.idle_stop, Database.plan,
    Database.parameters, Database.extensions,
    Database.source_snapshot_id, Database.last_error, Database.phase_timings, Database.created_at,
    Database.ready_at, Database.deleted_at, Database.server_host,
)

# Built once: a select of 24 columns costs more to make than to run.
_LISTING = select(*LISTED)
_SHOWING = _LISTING.where(Database.id == bindparam("id"))


@functools.cache
def _page_statements(admin: bool, by_status: bool, after: bool) -> tuple[Select, Select]:
    """A page of the list (with its total riding along on each row) and the
    total alone, for a tenant or an admin, of one status or all, after a
    cursor or at an offset: built once per shape, as building them is a good
    share of a page's time."""
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


class Registry:
    """Database rows and what is written along with them, nothing more."""

    def __init__(self, settings: Settings, store: Store, records: Records, vault: Vault, tenants: Tenants) -> None:
        self.settings = settings
        self.store = store
        self.records = records
        self.vault = vault
        self.tenants = tenants

    def add(
        self, tenant: str, new: NewDatabase, password: str, actor: str,
        idempotency: Idempotency | None = None, not_before: datetime | None = None, admin: bool = False,
    ) -> Database:
        """A new pending record with a host port reserved for it, provisioned
        from ``not_before`` on (at once without it). It counts against its
        tenant's limits (``Tenants.reserve``); a warm clone of a template
        against the template's tenant's."""
        # A copy's server keeps the superuser its data already has.
        copied = new.source or new.copy_of
        admin_username = copied.admin_username if copied else ADMIN_USERNAME
        admin_password = copied.admin_password if copied else self.vault.encrypt(new_password())
        for _ in range(PORT_ATTEMPTS):
            try:
                with self.store.transaction() as session:
                    charged = tenant
                    if tenant == POOL_TENANT:
                        # A version's own pool is nobody's; a template's clones wait for its tenant alone.
                        charged = new.template_id and session.scalar(
                            select(Template.tenant).where(Template.id == new.template_id)
                        )
                    if charged:
                        self.tenants.reserve(session, charged, new.plan, admin=admin)
                    if new.name is not None:
                        self.ensure_name_free(session, tenant, new.name)
                    columns = new.columns()
                    database_id = secrets.token_hex(6)  # matches ID_PATTERN
                    if new.copy_of is not None:
                        # A consistent copy first, which the clone's provisioning
                        # waits for; the clone's own, to reset to while it lives.
                        columns["source_snapshot_id"] = self.add_snapshot(
                            session, new.copy_of, actor, owner_id=database_id
                        ).id
                    record = Database(
                        id=database_id,
                        tenant=tenant,
                        status=Status.PENDING,
                        version=new.version,
                        image=self.settings.images[new.version],
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
                if idempotency is not None and self.key_taken(tenant, idempotency):
                    raise
                # Lost a race for the port or the name; the next round sees the winner.
                continue
            log.info(
                "database %s recorded for tenant %s: version %s, port %s",
                record.id, record.tenant, new.version, record.host_port,
            )
            return record
        raise PortRangeExhausted("could not reserve a host port; try again")

    def remember(self, session: Session, tenant: str, idempotency: Idempotency, database_id: str) -> None:
        """Keep the key with the database it made, in the create's transaction."""
        session.add(IdempotencyKey(
            tenant=tenant, key=idempotency.key, request_hash=idempotency.request_hash,
            database_id=database_id, created_at=utcnow(),
        ))

    def key_taken(self, tenant: str, idempotency: Idempotency) -> bool:
        with self.store.read() as session:
            return session.get(IdempotencyKey, (tenant, idempotency.key)) is not None

    def replay(self, principal: Principal, idempotency: Idempotency) -> Database | None:
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

    def add_snapshot(
        self, session: Session, record: Database, actor: str, template_id: str | None = None,
        owner_id: str | None = None, quota: int | None = None,
    ) -> Snapshot:
        """A pending snapshot of ``record``, inside the caller's transaction,
        one of at most ``quota`` its tenant keeps. A template's
        (``template_id``) or a clone's (``owner_id``) counts against none and
        goes with its owner.

        Whatever the snapshot is for (a clone, a template) belongs in the same
        transaction: the reconciler may take it the moment it is committed,
        and a request refused after it must leave none behind.
        """
        # Its database as it is now, locked: a reset or a delete committed
        # since the caller read it must not find a snapshot it was not after.
        status = session.scalar(select(Database.status).where(Database.id == record.id).with_for_update())
        if status not in SNAPSHOT_SOURCES:
            raise Conflict(f"database {record.id} is {status.value if status else 'gone'}; "
                           "a snapshot needs it ready, stopped or sleeping")
        if quota is not None:
            # Counted under the tenant's row lock, like databases.
            self.tenants.lock(session, record.tenant)
            kept = session.scalar(
                select(func.count()).select_from(Snapshot).where(
                    Snapshot.tenant == record.tenant,
                    Snapshot.template_id.is_(None),
                    Snapshot.owner_id.is_(None),
                    Snapshot.status.in_([SnapshotStatus.PENDING, SnapshotStatus.READY]),
                )
            )
            if kept >= quota:
                raise QuotaExceeded(
                    f"tenant {record.tenant!r} keeps {kept} of {quota} snapshots; delete one first",
                    used=kept, limit=quota,
                )
        snapshot = Snapshot(
            id=secrets.token_hex(6),
            tenant=record.tenant,
            database_id=record.id,
            template_id=template_id,
            owner_id=owner_id,
            status=SnapshotStatus.PENDING,
            version=record.version,
            image=record.image,
            admin_username=record.admin_username,
            admin_password=record.admin_password,
            created_at=utcnow(),
        )
        self.records.insert(session, snapshot)
        self.records.event(session, record, "snapshot-requested", actor, {"snapshot": snapshot.id})
        return snapshot
