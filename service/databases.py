"""The API's use cases: record wanted databases, read, rotate and delete them.

This layer owns the records' state and every decision about it; it never talks
to the engine. The reconciler makes the engine follow what is recorded here.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

import psycopg
import sqlalchemy.exc
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .crypto import Vault
from .errors import (
    Conflict,
    DatabaseServerError,
    Forbidden,
    NotFound,
    PortRangeExhausted,
    ValidationError,
)
from .images import Images
from .models import GOING, SETTLING, Database, Status
from .ports import pick_port
from .postgres import ServerAdmin, admin_login
from .records import Records
from .settings import Settings
from .store import Store
from .tenancy import POOL_TENANT, Principal, Tenants

if TYPE_CHECKING:
    from .pool import WarmPool

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
        records: Records,
        vault: Vault,
        tenants: Tenants,
        server_admin: ServerAdmin,
        images: Images,
    ) -> None:
        self.settings = settings
        self.store = store
        self.records = records
        self.vault = vault
        self.tenants = tenants
        self.server_admin = server_admin
        self.images = images
        # Set by the composition root when DBPROV_POOL_SIZE asks for warm servers.
        self.pool: WarmPool | None = None
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
        # Before anything is recorded: a version that cannot run holds no record and no port.
        self.images.require(version)
        password = self.vault.encrypt(new_password())
        if self.pool is not None:
            claimed = self.pool.claim(principal, name, version, superuser, password)
            if claimed is not None:
                return claimed
        return self.record(principal.tenant, name, version, superuser, password)

    def record(
        self, tenant: str, name: str | None, version: str, superuser: bool, password: str
    ) -> Database:
        """A new pending record with a host port reserved for it."""
        admin_password = self.vault.encrypt(new_password())
        for _ in range(_PORT_ATTEMPTS):
            try:
                with self.store.transaction() as session:
                    if tenant != POOL_TENANT:
                        self.tenants.reserve(session, tenant)
                    if name is not None:
                        self.ensure_name_free(session, tenant, name)
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
                    self.records.add(session, record)
            except sqlalchemy.exc.IntegrityError:
                # Lost a race for the port or the name; the next round sees the winner.
                continue
            log.info(
                "database %s recorded for tenant %s: version %s, port %s",
                record.id, record.tenant, version, record.host_port,
            )
            return record
        raise PortRangeExhausted("could not reserve a host port; try again")

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
        changed = self.records.transition(database_id, set(Status) - GOING, status=Status.DELETING)
        if changed is None:
            return self.get(principal, database_id)
        log.info("database %s: deletion requested", database_id)
        return changed

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
                self.server_admin.set_password(
                    admin_login(record, self.vault), record.username, password
                )
            except psycopg.Error as exc:
                # Only the class: a server message might echo the statement.
                raise DatabaseServerError(
                    f"the database server did not take the new password ({type(exc).__name__}); "
                    "the old one still works"
                ) from None
        log.info("database %s: password rotated", database_id)
        return record, self.credentials(record)

    def wait_until_settled(self, principal: Principal, database_id: str, timeout: float) -> Database:
        """The record once it is ready or failed, or as it is when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        changed = self.records.changed
        while True:
            seen = changed.generation
            record = self.get(principal, database_id)
            remaining = deadline - time.monotonic()
            if record.status not in SETTLING or remaining <= 0:
                return record
            # Writers nudge ``changed`` (in this process, or through the
            # store's change feed); the cap bounds the wait when nothing can.
            changed.wait(min(remaining, self.poll_interval), since=seen)
