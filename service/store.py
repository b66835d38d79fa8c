"""The metadata store: engine, transactions and migrations."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from importlib import resources
from typing import Iterator

import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from .errors import MetadataUnavailable

log = logging.getLogger(__name__)


class Store:
    """Owns the SQLAlchemy engine; every unit of work is one ``transaction()``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction, committed on success."""
        try:
            with self._sessions.begin() as session:
                yield session
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            # Connection refused, server gone, SQLite file locked for too long:
            # the request cannot be served now, but nothing was half-written.
            raise MetadataUnavailable(f"metadata store unavailable: {exc.orig!r}") from exc

    def ping(self) -> None:
        with self.transaction() as session:
            session.execute(text("SELECT 1"))

    def upgrade(self) -> None:
        """Apply every Alembic migration not yet applied."""
        try:
            with self.engine.begin() as connection:
                config = alembic_config()
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            raise MetadataUnavailable(f"metadata store unavailable: {exc.orig!r}") from exc

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("service.migrations")))
    return config


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):  # noqa: ANN001
        # Leave transaction control to the "begin" hook below; WAL lets readers
        # run beside the one writer.
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _begin(connection):  # noqa: ANN001
        # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers
        # queue on the busy timeout instead of failing on a lock upgrade.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
