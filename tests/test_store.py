"""The metadata store's pooled PostgreSQL connections: a dead one is replaced
without failing the request that gets it, and a live, busy one is handed out
without a round trip."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text

from service.store import engine as store_module
from service.store.engine import Store


@pytest.fixture
def store(postgres_url):
    store = Store(postgres_url)
    yield store
    store.dispose()


@pytest.fixture
def pings(store, monkeypatch):
    """Counts the pings the pool makes, each still made."""
    made = []
    ping = store.engine.dialect.do_ping

    def counted(dbapi_connection):
        made.append(dbapi_connection)
        return ping(dbapi_connection)

    monkeypatch.setattr(store.engine.dialect, "do_ping", counted)
    return made


def backend_pid(store: Store) -> int:
    with store.lookup() as connection:
        return connection.scalar(text("SELECT pg_backend_pid()"))


def test_a_connection_the_server_ended_is_replaced_without_an_error(store, postgres_url, pings):
    first = backend_pid(store)
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        # As a restarted or failed-over server ends its sessions.
        assert connection.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
    admin.dispose()
    time.sleep(0.2)  # the server's farewell reaches the idle connection

    assert backend_pid(store) != first
    assert len(pings) == 1  # the ended one was suspect, and its ping failed


def test_a_busy_pool_hands_out_connections_without_a_ping(store, pings):
    pids = {backend_pid(store) for _ in range(20)}
    assert len(pids) == 1 and pings == []


def test_a_connection_idle_for_long_is_pinged_first(store, pings, monkeypatch):
    first = backend_pid(store)
    monkeypatch.setattr(store_module, "_TRUSTED_IDLE", 0.0)
    assert backend_pid(store) == first  # pinged, alive, and used
    assert len(pings) == 1
