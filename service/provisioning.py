"""What the API asks of the service: record wanted databases, read and delete them.

This layer owns the records' state and every decision about it; it never talks
to Docker. The reconciler makes the engine follow what is recorded here.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote

import sqlalchemy.exc
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .errors import Conflict, NotFound, PortRangeExhausted, ValidationError
from .models import Database, Status, utcnow
from .notify import Notifier
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ID_PATTERN = r"[0-9a-f]{12}"
# Each database has a server of its own, so fixed names inside it clash with nothing.
DATABASE_NAME = "app"
USERNAME = "app"
# Concurrent creates may pick the same free port; the unique constraint lets
# one win and the others pick again.
_PORT_ATTEMPTS = 20


@dataclass(frozen=True)
class Page:
    items: list[Database]
    page: int
    page_size: int
    total: int


def connection_uri(record: Database, host: str) -> str:
    return (
        f"postgresql://{quote(record.username, safe='')}:{quote(record.password, safe='')}"
        f"@{host}:{record.host_port}/{quote(record.database_name, safe='')}"
    )


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


def _check_id(database_id: str) -> None:
    # Anything else cannot exist; refusing it here keeps odd bytes (NUL, say)
    # away from the metadata store's driver.
    if not re.fullmatch(ID_PATTERN, database_id):
        raise NotFound(f"no database with id {database_id!r}")


class Databases:
    """The domain service behind the HTTP views."""

    def __init__(
        self, settings: Settings, store: Store, wanted: Notifier, changed: Notifier
    ) -> None:
        self.settings = settings
        self.store = store
        self._wanted = wanted
        self._changed = changed
        # Re-read interval while waiting; raised when a change feed delivers nudges.
        self.poll_interval = 0.25

    def create(self, name: str | None = None, version: str | None = None) -> Database:
        """Record a wanted database with its port reserved; the reconciler starts it."""
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
        for _ in range(_PORT_ATTEMPTS):
            try:
                with self.store.transaction() as session:
                    if name is not None:
                        self._ensure_name_free(session, name)
                    record = Database(
                        id=secrets.token_hex(6),  # matches ID_PATTERN
                        name=name,
                        status=Status.PENDING,
                        version=version,
                        image=self.settings.images[version],
                        host_port=pick_port(session, self.settings.port_range),
                        database_name=DATABASE_NAME,
                        username=USERNAME,
                        # URL-safe, so the URI needs no escaping in any client.
                        password=secrets.token_urlsafe(24),
                        phase_timings={},
                    )
                    session.add(record)
                    self.store.announce(session, record.id)
            except sqlalchemy.exc.IntegrityError:
                # Lost a race for the port or the name; the next round sees the winner.
                continue
            log.info("database %s recorded: version %s, port %s", record.id, version, record.host_port)
            self._wanted.notify()
            return record
        raise PortRangeExhausted("could not reserve a host port; try again")

    def _ensure_name_free(self, session: Session, name: str) -> None:
        taken = session.scalar(
            select(Database.id).where(Database.name == name, Database.status != Status.DELETED)
        )
        if taken is not None:
            raise Conflict(f"a database named {name!r} already exists", database_id=taken)

    def get(self, database_id: str) -> Database:
        _check_id(database_id)
        with self.store.transaction() as session:
            record = session.get(Database, database_id)
        if record is None:
            raise NotFound(f"no database with id {database_id!r}")
        return record

    def list(self, status: Status | None = None, page: int = 1, page_size: int = 50) -> Page:
        query = select(Database)
        if status is not None:
            query = query.where(Database.status == status)
        with self.store.transaction() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            items = list(
                session.scalars(
                    query.order_by(Database.created_at.desc(), Database.id)
                    .offset((page - 1) * page_size)
                    .limit(page_size)
                )
            )
        return Page(items=items, page=page, page_size=page_size, total=total or 0)

    def delete(self, database_id: str) -> Database:
        """Mark a database for removal; repeating it changes nothing."""
        _check_id(database_id)
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
        if record is None:
            raise NotFound(f"no database with id {database_id!r}")
        log.info("database %s: deletion requested", database_id)
        self._wanted.notify()
        return record

    def wait_until_settled(self, database_id: str, timeout: float) -> Database:
        """The record once it is ready or failed, or as it is when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self._changed.generation
            record = self.get(database_id)
            remaining = deadline - time.monotonic()
            if record.status not in (Status.PENDING, Status.PROVISIONING) or remaining <= 0:
                return record
            # Writers nudge ``changed`` (in this process, or through the
            # store's change feed); the cap bounds the wait when nothing can.
            self._changed.wait(min(remaining, self.poll_interval), since=seen)
