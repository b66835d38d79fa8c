"""What the API asks of the service: record wanted databases, read, rotate and delete them.

This layer owns the records' state and every decision about it; it never talks
to Docker. The reconciler makes the engine follow what is recorded here.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote

import psycopg
import sqlalchemy.exc
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .coordination import Claims
from .crypto import Vault
from .errors import (
    Conflict,
    DatabaseServerError,
    Forbidden,
    NotFound,
    PortRangeExhausted,
    ValidationError,
)
from .models import Database, Status, utcnow
from .notify import Notifier
from .postgres import Login, ServerAdmin
from .settings import Settings
from .store import Store
from .tenancy import POOL_TENANT, Principal, Tenants

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ID_PATTERN = r"[0-9a-f]{12}"
# Each database has a server of its own, so fixed names inside it clash with nothing.
DATABASE_NAME = "app"
USERNAME = "app"
# The container's superuser, kept by the service.
ADMIN_USERNAME = "dbprov_admin"
# Concurrent creates may pick the same free port; the unique constraint lets
# one win and the others pick again.
_PORT_ATTEMPTS = 20


def new_password() -> str:
    # URL-safe, so the URI needs no escaping in any client.
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Page:
    items: list[Database]
    page: int
    page_size: int
    total: int


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    database: str
    host: str
    port: int | None

    @property
    def connection_uri(self) -> str | None:
        if self.port is None:
            return None
        return (
            f"postgresql://{quote(self.username, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}"
        )

    def __repr__(self) -> str:
        return f"Credentials({self.username}@{self.host}:{self.port}/{self.database})"


def pick_port(session: Session, port_range: tuple[int, int]) -> int:
    """A host port in ``port_range`` that no live database holds."""
    first, last = port_range
    used = set(session.scalars(select(Database.host_port).where(Database.host_port.is_not(None))))
    free = [port for port in range(first, last + 1) if port not in used]
    if not free:
        raise PortRangeExhausted(
            f"all {last - first + 1} ports of {first}-{last} are held by live databases; "
            "delete one or widen DBPROV_PORT_RANGE"
        )
    # Random rather than lowest-first, so concurrent creates seldom collide.
    return random.choice(free)


def admin_login(record: Database, vault: Vault, host: str) -> Login:
    """The service's own login to a database's server."""
    return Login(
        host=host,
        port=record.host_port,
        user=record.admin_username,
        password=vault.decrypt(record.admin_password),
    )


def set_up_tenant(server_admin: ServerAdmin, record: Database, vault: Vault, host: str) -> None:
    """The tenant's role with its password inside the server, then the check that
    counts: ``SELECT 1`` as the tenant. Raises ``psycopg.Error``."""
    password = vault.decrypt(record.password)
    admin = admin_login(record, vault, host)
    # Databases made before tenant roles existed have the tenant as superuser.
    if record.admin_username != record.username:
        server_admin.ensure_tenant_role(
            admin, record.username, password, record.database_name, record.superuser
        )
    server_admin.check(
        dataclasses.replace(
            admin, user=record.username, password=password, dbname=record.database_name
        )
    )


def _class(exc: Exception) -> str:
    # Only the class of a server's error: its message might echo a statement.
    return type(exc).__name__


def _check_id(database_id: str) -> None:
    # Anything else cannot exist; refusing it here keeps odd bytes (NUL, say)
    # away from the metadata store's driver.
    if not re.fullmatch(ID_PATTERN, database_id):
        raise NotFound(f"no database with id {database_id!r}")


class Databases:
    """The domain service behind the HTTP views."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        vault: Vault,
        tenants: Tenants,
        server_admin: ServerAdmin,
        claims: Claims,
        wanted: Notifier,
        changed: Notifier,
    ) -> None:
        self.settings = settings
        self.store = store
        self.vault = vault
        self.tenants = tenants
        self._server_admin = server_admin
        self._claims = claims
        self._wanted = wanted
        self._changed = changed
        # Re-read interval while waiting; raised when a change feed delivers nudges.
        self.poll_interval = 0.25

    def create(
        self,
        principal: Principal,
        name: str | None = None,
        version: str | None = None,
        superuser: bool = False,
    ) -> Database:
        """A warm pool member made the tenant's, or else a new record with its port
        reserved, which the reconciler starts."""
        version = version or self.settings.default_version
        if version not in self.settings.images:
            raise ValidationError(
                f"unsupported version {version!r}; supported: {', '.join(self.settings.images)}",
                errors={"json": {"version": [f"Must be one of: {', '.join(self.settings.images)}."]}},
            )
        if name is not None and not re.fullmatch(NAME_PATTERN, name):
            raise ValidationError(
                "invalid name", errors={"json": {"name": [f"Must match {NAME_PATTERN}."]}}
            )
        if superuser and not self.settings.allow_superuser:
            raise Forbidden("this service does not hand out superuser roles (DBPROV_ALLOW_SUPERUSER)")
        password = self.vault.encrypt(new_password())
        if self.settings.pool_sizes.get(version):
            claimed = self._claim_warm(principal, name, version, superuser, password)
            if claimed is not None:
                return claimed
        return self._record(principal.tenant, name, version, superuser, password)

    def _record(
        self, tenant: str, name: str | None, version: str, superuser: bool, password: str
    ) -> Database:
        admin_password = self.vault.encrypt(new_password())
        for _ in range(_PORT_ATTEMPTS):
            try:
                with self.store.transaction() as session:
                    if tenant != POOL_TENANT:
                        self.tenants.reserve(session, tenant)
                    if name is not None:
                        self._ensure_name_free(session, tenant, name)
                    record = Database(
                        id=secrets.token_hex(6),  # matches ID_PATTERN
                        tenant=tenant,
                        name=name,
                        status=Status.PENDING,
                        version=version,
                        image=self.settings.images[version],
                        host_port=pick_port(session, self.settings.port_range),
                        database_name=DATABASE_NAME,
                        username=USERNAME,
                        password=password,
                        superuser=superuser,
                        admin_username=ADMIN_USERNAME,
                        admin_password=admin_password,
                        phase_timings={},
                    )
                    session.add(record)
                    self.store.announce(session, record.id)
            except sqlalchemy.exc.IntegrityError:
                # Lost a race for the port or the name; the next round sees the winner.
                continue
            log.info(
                "database %s recorded for tenant %s: version %s, port %s",
                record.id, record.tenant, version, record.host_port,
            )
            self._wanted.notify()
            return record
        raise PortRangeExhausted("could not reserve a host port; try again")

    def _claim_warm(
        self, principal: Principal, name: str | None, version: str, superuser: bool, password: str
    ) -> Database | None:
        """Make a warm pool member the tenant's: None when the pool is empty or the claim failed."""
        started = time.monotonic()
        with self.store.transaction() as session:
            self.tenants.reserve(session, principal.tenant)
            if name is not None:
                self._ensure_name_free(session, principal.tenant, name)
            query = (
                select(Database)
                .where(
                    Database.tenant == POOL_TENANT,
                    Database.status == Status.READY,
                    Database.version == version,
                )
                .order_by(Database.created_at)
                .limit(1)
            )
            if self.store.is_postgres:
                # Parallel claims each take a different member instead of queueing.
                query = query.with_for_update(skip_locked=True)
            member = session.scalar(query)
            if member is None:
                return None
            member.tenant = principal.tenant
            member.name = name
            member.superuser = superuser
            member.password = password
            member.status = Status.PROVISIONING
            member.created_at = utcnow()
            member.ready_at = None
            member.phase_timings = {}
            self.store.announce(session, member.id)
        # The pool is one short now: the reconciler refills it.
        self._wanted.notify()
        with self._claims.hold(member.id) as mine:
            if not mine:
                # A reconciler got to it first and finishes it the same way.
                return member
            try:
                set_up_tenant(
                    self._server_admin, member, self.vault, self.settings.effective_probe_host
                )
            except psycopg.Error as exc:
                log.warning("database %s: claim failed (%s); starting a cold one", member.id, _class(exc))
                self._release_claim(member)
                return None
        timings = {"claim": round(time.monotonic() - started, 3)}
        with self.store.transaction() as session:
            session.execute(
                update(Database)
                .where(Database.id == member.id, Database.status == Status.PROVISIONING)
                .values(status=Status.READY, ready_at=utcnow(), phase_timings=timings, updated_at=utcnow())
            )
            self.store.announce(session, member.id)
            member = session.get(Database, member.id)
        log.info("database %s: warm server claimed for tenant %s (%.3f s)", member.id, member.tenant, timings["claim"])
        self._changed.notify()
        return member

    def _release_claim(self, member: Database) -> None:
        """A claim that failed: back to the pool's name, to be removed."""
        with self.store.transaction() as session:
            session.execute(
                update(Database)
                .where(Database.id == member.id)
                .values(tenant=POOL_TENANT, name=None, status=Status.DELETING, updated_at=utcnow())
            )
            self.store.announce(session, member.id)
        self._wanted.notify()

    def stock_pool(self) -> int:
        """Bring each version's pool to its DBPROV_POOL_SIZE; returns how many members were added.

        Workers stocking at the same moment may overshoot; the surplus is
        trimmed on the next pass, so the pool settles at its size.
        """
        added = 0
        for version, size in self.settings.pool_sizes.items():
            with self.store.transaction() as session:
                # Failed members are of no use to anyone: have them removed.
                session.execute(
                    update(Database)
                    .where(Database.tenant == POOL_TENANT, Database.status == Status.FAILED)
                    .values(status=Status.DELETING, updated_at=utcnow())
                )
                stocked = list(
                    session.scalars(
                        select(Database.id)
                        .where(
                            Database.tenant == POOL_TENANT,
                            Database.version == version,
                            Database.status.in_((Status.PENDING, Status.PROVISIONING, Status.READY)),
                        )
                        .order_by(Database.created_at)
                    )
                )
                surplus = stocked[size:]
                if surplus:
                    session.execute(
                        update(Database)
                        .where(Database.id.in_(surplus), Database.tenant == POOL_TENANT)
                        .values(status=Status.DELETING, updated_at=utcnow())
                    )
            for _ in range(size - len(stocked)):
                try:
                    self._record(POOL_TENANT, None, version, False, self.vault.encrypt(new_password()))
                except PortRangeExhausted:
                    return added  # tenants come first; the pool waits for free ports
                added += 1
        return added

    def _ensure_name_free(self, session: Session, tenant: str, name: str) -> None:
        taken = session.scalar(
            select(Database.id).where(
                Database.tenant == tenant, Database.name == name, Database.status != Status.DELETED
            )
        )
        if taken is not None:
            raise Conflict(f"a database named {name!r} already exists", database_id=taken)

    def get(self, principal: Principal, database_id: str) -> Database:
        _check_id(database_id)
        with self.store.read() as session:
            record = session.get(Database, database_id)
        # Another tenant's database looks exactly like one that does not exist.
        if record is None or not principal.sees(record) or record.tenant == POOL_TENANT:
            raise NotFound(f"no database with id {database_id!r}")
        return record

    def list(
        self,
        principal: Principal,
        status: Status | None = None,
        page: int = 1,
        page_size: int = 50,
    ) -> Page:
        query = select(Database).where(Database.tenant != POOL_TENANT)
        if not principal.admin:
            query = query.where(Database.tenant == principal.tenant)
        if status is not None:
            query = query.where(Database.status == status)
        with self.store.read() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            items = list(
                session.scalars(
                    query.order_by(Database.created_at.desc(), Database.id)
                    .offset((page - 1) * page_size)
                    .limit(page_size)
                )
            )
        return Page(items=items, page=page, page_size=page_size, total=total or 0)

    def delete(self, principal: Principal, database_id: str) -> Database:
        """Mark a database for removal; repeating it changes nothing."""
        self.get(principal, database_id)
        with self.store.transaction() as session:
            session.execute(
                update(Database)
                .where(
                    Database.id == database_id,
                    Database.status.not_in((Status.DELETING, Status.DELETED)),
                )
                .values(status=Status.DELETING, updated_at=utcnow())
            )
            record = session.get(Database, database_id)
            self.store.announce(session, database_id)
        log.info("database %s: deletion requested", database_id)
        self._wanted.notify()
        return record

    def credentials(self, record: Database) -> Credentials:
        return Credentials(
            username=record.username,
            password=self.vault.decrypt(record.password),
            database=record.database_name,
            host=self.settings.public_host,
            port=record.host_port,
        )

    def rotate_password(self, principal: Principal, database_id: str) -> tuple[Database, Credentials]:
        """A new password that works at once; the old one stops working."""
        self.get(principal, database_id)
        password = new_password()
        with self.store.transaction() as session:
            # The row lock keeps a second rotation, or a delete, from interleaving.
            record = session.scalar(
                select(Database).where(Database.id == database_id).with_for_update()
            )
            if record.status != Status.READY:
                raise Conflict(f"database {database_id} is {record.status.value}, not ready")
            record.password = self.vault.encrypt(password)
            # Changed on the server inside the metadata transaction: if the
            # server refuses, the stored password stays the working one.
            try:
                self._server_admin.set_password(
                    admin_login(record, self.vault, self.settings.effective_probe_host),
                    record.username,
                    password,
                )
            except psycopg.Error as exc:
                # Only the class: a server message might echo the statement.
                raise DatabaseServerError(
                    f"the database server did not take the new password ({type(exc).__name__}); "
                    "the old one still works"
                ) from None
        log.info("database %s: password rotated", database_id)
        return record, self.credentials(record)

    def reencrypt_secrets(self) -> int:
        """Re-encrypt every stored password with the vault's first key; returns how many records."""
        with self.store.transaction() as session:
            records = list(session.scalars(select(Database)))
            for record in records:
                record.password = self.vault.rotate(record.password)
                record.admin_password = self.vault.rotate(record.admin_password)
        return len(records)

    def wait_until_settled(self, principal: Principal, database_id: str, timeout: float) -> Database:
        """The record once it is ready or failed, or as it is when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self._changed.generation
            record = self.get(principal, database_id)
            remaining = deadline - time.monotonic()
            if record.status not in (Status.PENDING, Status.PROVISIONING) or remaining <= 0:
                return record
            # Writers nudge ``changed`` (in this process, or through the
            # store's change feed); the cap bounds the wait when nothing can.
            self._changed.wait(min(remaining, self.poll_interval), since=seen)
