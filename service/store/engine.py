"""The metadata store: engine, transactions, migrations and change notifications."""

from __future__ import annotations

import functools
import logging
import select
import threading
import time
from contextlib import contextmanager
from importlib import resources
from typing import TYPE_CHECKING, Iterator

import orjson
import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from ..errors import MetadataUnavailable

if TYPE_CHECKING:
    from .crypto import Vault

log = logging.getLogger(__name__)

# PostgreSQL NOTIFY channel on which every change to a record is announced.
CHANNEL = "dbprov_changes"
# SQLSTATE of "relation does not exist": the schema has not been migrated yet.
_UNDEFINED_TABLE = "42P01"
# Advisory lock key held while migrating ("dbpm").
_MIGRATION_LOCK = 0x6462706D
# Seconds a pooled PostgreSQL connection may have been idle and still be
# handed out without a ping (see _check_on_checkout).
_TRUSTED_IDLE = 10.0


@contextmanager
def _outages_translated() -> Iterator[None]:
    """Connection trouble, or a schema that is not there yet, as MetadataUnavailable:
    nothing was half-written, and the caller may say "try again later"."""
    try:
        yield
    except sqlalchemy.exc.DBAPIError as exc:
        outage = isinstance(
            exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
        ) or (
            isinstance(exc, sqlalchemy.exc.ProgrammingError)
            and getattr(exc.orig, "sqlstate", None) == _UNDEFINED_TABLE
        )
        if not outage:
            raise
        raise MetadataUnavailable(
            f"metadata store unavailable: {type(exc.orig).__name__}: {exc.orig}"
        ) from exc


class Store:
    """Owns the SQLAlchemy engine; every unit of work is one ``transaction()``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: reads get an engine of their own whose transactions start
        # deferred, so they neither take nor wait for the write lock (WAL
        # readers see a consistent snapshot). Elsewhere one engine does both.
        self.read_engine = _make_engine(url, begin="BEGIN") if not self.is_postgres else self.engine
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        # Reads of one statement (a token, a record, a page of the list) need
        # no transaction around them: on PostgreSQL its BEGIN and COMMIT would
        # be two more round trips.
        self.lookup_engine = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.is_postgres
            else _make_engine(url, begin=None)
        )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction, committed on success."""
        with _outages_translated(), self._sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading only: never blocked by writers."""
        with _outages_translated(), self._read_sessions.begin() as session:
            yield session

    @contextmanager
    def lookup(self) -> Iterator[Connection]:
        """A connection for reads that are one Core statement each: every
        statement sees what was committed when it began, without a
        transaction, and without an ORM session (a third of such a read)."""
        with _outages_translated(), self.lookup_engine.connect() as connection:
            yield connection

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A pooled connection of its own, for work that spans transactions."""
        with _outages_translated(), self.engine.connect() as connection:
            yield connection

    def announce(self, session: Session, wake_in: float | None = None) -> None:
        """Tell other processes, once this transaction commits, that records
        changed: their reconcilers to look at once, or in ``wake_in`` seconds."""
        if self.is_postgres:
            session.execute(
                text("SELECT pg_notify(:channel, :wake_in)"),
                {"channel": CHANNEL, "wake_in": "" if wake_in is None else repr(wake_in)},
            )

    def ping(self) -> None:
        """Reachable, and migrated to the schema this code expects."""
        with self.read() as session:
            current = session.scalar(text("SELECT version_num FROM alembic_version"))
        if current != head_revision():
            raise MetadataUnavailable(
                f"metadata schema is at {current}, this code needs {head_revision()}: "
                "run `dbprov db upgrade`"
            )

    def upgrade(self, vault: "Vault | None" = None) -> None:
        """Apply every Alembic migration not yet applied.

        ``vault``: for migrations that encrypt or decrypt stored secrets.
        """
        with _outages_translated(), self.engine.begin() as connection:
            if self.is_postgres:
                # Workers starting together must not migrate side by side.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
            config = alembic_config()
            config.attributes["connection"] = connection
            config.attributes["vault"] = vault
            command.upgrade(config, "head")

    def upgrade_when_up(
        self,
        vault: "Vault | None" = None,
        stopping: threading.Event | None = None,
        max_delay: float = 10.0,
    ) -> bool:
        """Migrate, retrying with backoff while the store is unreachable; False if stopped."""
        stopping = stopping or threading.Event()
        delay = 0.5
        while not stopping.is_set():
            try:
                self.upgrade(vault)
                return True
            except MetadataUnavailable as exc:
                log.warning("%s; retrying in %.1f s", exc, delay)
                stopping.wait(delay)
                delay = min(delay * 2, max_delay)
        return False

    def dispose(self) -> None:
        self.engine.dispose()
        # On PostgreSQL reads and lookups share the engine's pool.
        if not self.is_postgres:
            self.read_engine.dispose()
            self.lookup_engine.dispose()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("service.migrations")))
    return config


@functools.cache
def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _make_engine(url: str, begin: str | None = "BEGIN IMMEDIATE") -> Engine:
    if not url.startswith("sqlite"):
        engine = create_engine(url, pool_size=10, max_overflow=20, json_deserializer=orjson.loads)
        _check_on_checkout(engine)
        return engine
    engine = create_engine(
        url, connect_args={"timeout": 30, "check_same_thread": False}, json_deserializer=orjson.loads
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):  # noqa: ANN001
        # Leave transaction control to the "begin" hook below; WAL lets readers
        # run beside the one writer.
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    if begin is not None:
        @event.listens_for(engine, "begin")
        def _begin(connection):  # noqa: ANN001
            # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers
            # queue on the busy timeout instead of failing on a lock upgrade.
            connection.exec_driver_sql(begin)

    return engine


def _check_on_checkout(engine: Engine) -> None:
    """Replace a pooled connection that died (with a restarted or failed-over
    server) instead of failing the request that gets it, as pool_pre_ping
    does, but without its round trip on every checkout: that was one of a
    lookup's two. A server that ends a connection tells it (an error, then
    end of stream), so an idle connection with anything to read is suspect
    and pinged; so is one idle for a while, which a firewall or NAT may have
    dropped without a word. The rest, the busy pool's, go out as they are.
    """

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection, record) -> None:  # noqa: ANN001
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection, record, _proxy) -> None:  # noqa: ANN001
        idle = time.monotonic() - record.info.get("idle_since", 0.0)
        try:
            if idle < _TRUSTED_IDLE and not _has_input(dbapi_connection.fileno()):
                return
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool closes this one and checks out another, up to three times.
            raise sqlalchemy.exc.DisconnectionError(str(exc)) from exc


def _has_input(fd: int) -> bool:
    """Whether the server sent anything (or hung up) on an idle connection."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))
