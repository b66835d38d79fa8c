"""The listeners that hold sleeping databases' ports, and how they turn a
client away: real sockets and a real libpq client, no engine."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

import psycopg
import pytest

from service.errors import EngineError
from service.postgres.wire import refuse
from service.reconciler.wake import MAX_WAITING, Sleepers, relay

# What libpq sends first with sslmode=prefer: length 8, code 80877103.
SSL_REQUEST = struct.pack("!II", 8, 80877103)


def closed(sock: socket.socket) -> bool:
    """Whether the other side closed (a reset, if what was sent went unread)."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def sleepers():
    woken: list[str] = []
    arrived = threading.Event()

    def on_connect(database_id: str) -> None:
        woken.append(database_id)
        arrived.set()

    held = Sleepers(on_connect)
    held.woken, held.arrived = woken, arrived
    yield held
    held.close()


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_a_client_that_cannot_be_served_gets_a_postgres_error_naming_why(sleepers, sslmode):
    port = free_port()
    assert sleepers.hold("db1", "127.0.0.1", port)

    def answer() -> None:
        assert sleepers.arrived.wait(10)
        clients, since = sleepers.take("db1")
        assert since is not None
        for client in clients:
            refuse(client, "dbprov: database db1 cannot take connections: it is lost")

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(psycopg.OperationalError, match="db1 cannot take connections: it is lost"):
        psycopg.connect(host="127.0.0.1", port=port, user="u", password="p", sslmode=sslmode, connect_timeout=10)
    assert sleepers.woken == ["db1"]


def test_a_release_keeps_the_queued_connections_and_frees_the_port(sleepers):
    port = free_port()
    assert sleepers.hold("db1", "127.0.0.1", port)
    assert sleepers.holds("db1") and sleepers.count() == 1
    # Another holder of the port is refused: a port is never held twice.
    assert not sleepers.hold("db2", "127.0.0.1", port)
    with pytest.raises(OSError):
        socket.create_server(("127.0.0.1", port))
    early = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    sleepers.release("db1")
    assert not sleepers.holds("db1")
    clients, _ = sleepers.take("db1")
    assert len(clients) == 3
    # The port is free for the server that comes next.
    server = socket.create_server(("127.0.0.1", port))
    # A waiting connection, relayed to that server, carries bytes both ways.
    relay(clients[0], ("127.0.0.1", port), "test")
    upstream, _ = server.accept()
    early[0].sendall(b"ping")
    assert upstream.recv(4) == b"ping"
    upstream.sendall(b"pong")
    assert early[0].recv(4) == b"pong"
    # One side closing closes the other.
    upstream.close()
    assert early[0].recv(4) == b""
    for sock in (*early, *clients[1:], server):
        sock.close()


def test_a_database_is_said_asleep_only_with_its_port_bound_and_before_anything_is_served(sleepers):
    # Another sleeps already: the thread that serves every listener runs.
    assert sleepers.hold("db0", "127.0.0.1", free_port())
    port = free_port()
    early: list[socket.socket] = []

    def asleep() -> bool:
        # Bound already: a client that reads "sleeping" and connects waits in the backlog.
        early.append(socket.create_connection(("127.0.0.1", port)))
        early[0].sendall(SSL_REQUEST)
        assert not sleepers.arrived.wait(0.3)
        return True

    assert sleepers.hold("db1", "127.0.0.1", port, asleep)
    # Served once the record says so: it wakes the database.
    assert sleepers.arrived.wait(5) and sleepers.woken == ["db1"]
    early[0].close()


def test_the_port_is_held_the_moment_the_engine_lets_go_of_it_while_the_stop_goes_on(sleepers):
    port = free_port()
    engine = socket.create_server(("127.0.0.1", port))  # the engine's proxy, publishing the server
    came: list[socket.socket] = []
    order: list[str] = []

    def stop() -> None:
        time.sleep(0.1)
        engine.close()  # the port let go ...
        time.sleep(0.2)  # ... and the engine's cleanup goes on: a client comes meanwhile
        deadline = time.monotonic() + 2
        while not came:
            try:
                came.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the port was not held while the stop went on"
                time.sleep(0.01)
        came[0].sendall(SSL_REQUEST)
        order.append("stopped")

    def asleep() -> bool:
        order.append("asleep")
        return True

    assert sleepers.hold("db1", "127.0.0.1", port, asleep, stop=stop)
    # Not refused: it waited in the backlog, said asleep only after the stop, and it wakes the database.
    assert order == ["stopped", "asleep"]
    assert sleepers.arrived.wait(5) and sleepers.woken == ["db1"]
    came[0].close()


def test_a_stop_that_fails_lets_the_port_go_and_says_why(sleepers):
    port = free_port()

    def stop() -> None:
        raise EngineError("the engine said no")

    with pytest.raises(EngineError):
        sleepers.hold("db1", "127.0.0.1", port, lambda: pytest.fail("said asleep"), stop=stop)
    assert not sleepers.holds("db1")
    socket.create_server(("127.0.0.1", port)).close()


def test_a_record_that_moved_on_instead_of_sleeping_lets_the_port_go(sleepers):
    port = free_port()
    assert not sleepers.hold("db1", "127.0.0.1", port, lambda: False)
    assert not sleepers.holds("db1")
    socket.create_server(("127.0.0.1", port)).close()


def test_a_flood_of_connections_to_a_sleeping_port_is_cut_off_at_the_cap(sleepers):
    port = free_port()
    assert sleepers.hold("db1", "127.0.0.1", port)
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_WAITING + 50)]
    sleepers.release("db1")
    clients, _ = sleepers.take("db1")
    assert len(clients) == MAX_WAITING
    # The ones past the cap were closed, not kept.
    readable, _, _ = select.select(flood, [], [], 2)
    assert len(readable) == 50 and all(sock.recv(1) == b"" for sock in readable)
    for sock in (*flood, *clients):
        sock.close()


def test_only_a_postgres_client_wakes_a_database_not_a_bare_connect_or_garbage(sleepers):
    port = free_port()
    assert sleepers.hold("db1", "127.0.0.1", port)
    # A port scanner's connect, and a client that speaks something else: closed, nothing woken.
    socket.create_connection(("127.0.0.1", port)).close()
    http = socket.create_connection(("127.0.0.1", port))
    http.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed(http)
    assert not sleepers.arrived.wait(0.5) and not sleepers.waiting("db1")
    # A PostgreSQL client's first packet wakes it, and is still there for the server.
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(SSL_REQUEST)
    assert sleepers.arrived.wait(5) and sleepers.woken == ["db1"]
    sleepers.release("db1")
    (waiting,), _ = sleepers.take("db1")
    waiting.settimeout(5)
    assert waiting.recv(8) == SSL_REQUEST
    for sock in (http, client, waiting):
        sock.close()


def test_closing_gives_every_port_back(sleepers):
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        assert sleepers.hold(f"db{i}", "127.0.0.1", port)
    waiting = socket.create_connection(("127.0.0.1", ports[0]))
    waiting.sendall(SSL_REQUEST)
    assert sleepers.arrived.wait(10)
    sleepers.close()
    assert closed(waiting)  # as by a server that went away
    for port in ports:
        socket.create_server(("127.0.0.1", port)).close()
    waiting.close()
