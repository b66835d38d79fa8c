"""Sleeping databases: their ports held by the service, and woken by a connection.

A database that had no clients for its ``idle_stop`` sleeps: its server is
stopped, and the service listens on its published port itself. The first
connection wakes it: the listener gives the port back, the server starts on
it, and the connections that came meanwhile are relayed to it once it
answers. Later connections reach the server directly, so a relay lasts only
as long as those first connections, and the service is in no steady path
(measured in docs/performance.md; relaying every connection was the other
way).

Between the listener letting go and the engine publishing the port again,
a connection is refused: the engine cannot publish a port that the service
still holds. The listener drains its queue as it lets go, so only a
connection that arrives in that gap (the engine's start up to its bind,
docs/performance.md) is refused.

One thread serves every listener (a selector), so a sleeping database costs
one descriptor and no thread.
"""

from __future__ import annotations

import logging
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable

from ..postgres.wire import is_first_packet

log = logging.getLogger(__name__)

# Connections queued on a listener before the first is accepted.
_BACKLOG = 128
# A connection that has not said it is a PostgreSQL client by then is closed.
_FIRST_BYTES_WITHIN = 10.0
# What a selector key's data says its socket is.
_LISTENER, _CLIENT = "listener", "client"
# Connections a sleeping database keeps waiting for its wake (PostgreSQL's
# default max_connections): the rest are closed at once, so that a flood of
# connections to one port cannot spend the descriptors every listener needs.
MAX_WAITING = 100
_RELAY_CHUNK = 65536


class Sleepers:
    """The listeners of this process's sleeping databases, and the connections they hold.

    A connection wakes its database once its first bytes are a PostgreSQL
    client's (a startup, SSL, GSSAPI or cancel request, read without being
    consumed): a port scan's bare connect does not start a server.
    """

    def __init__(self, on_connect: Callable[[str], None]) -> None:
        self._on_connect = on_connect
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._listeners: dict[str, socket.socket] = {}
        # Accepted, their first bytes not yet seen: when each came.
        self._unproven: dict[socket.socket, tuple[str, float]] = {}
        # Connections that wait for the wake, and when the first came.
        self._waiting: dict[str, list[socket.socket]] = {}
        self._since: dict[str, float] = {}
        # Why a port could not be held, said once until it changes (a pass asks again each time).
        self._refused: dict[str, str] = {}
        self._stopping = threading.Event()
        # Started with the first listener: most reconcilers never hold one.
        self._thread: threading.Thread | None = None

    def hold(
        self, database_id: str, address: str, port: int, asleep: Callable[[], bool] | None = None,
        stop: Callable[[], None] | None = None,
    ) -> bool:
        """Listen on the database's port; False if it cannot be had (something else holds it).

        ``stop``, if given, stops the server first, and the port is bound the
        moment the engine lets go of it, while the stop goes on: the engine
        cleans up for about 100 ms more, and a connection in that time was
        refused; now it waits in the backlog.

        ``asleep``, if given, is asked once the port is bound and the server
        stopped, and before any connection is served (they wait in the backlog
        meanwhile): it makes the database's record sleeping, so a database is
        never said to sleep with nobody listening. If it says no (the record
        moved on), the port is let go again, and what waited in the backlog is
        reset.
        """
        early = _stop_and_listen(stop, address, port) if stop is not None else None
        with self._lock:
            if database_id in self._listeners:
                if early is not None:
                    early.close()
                return asleep is None or asleep()
            try:
                listener = early or _listen(address, port)
            except OSError as exc:
                if self._refused.get(database_id) != str(exc):
                    log.warning("database %s: cannot hold port %s while it sleeps: %s", database_id, port, exc)
                self._refused[database_id] = str(exc)
                return False
            self._refused.pop(database_id, None)
        # Outside the lock: the record's write must not stall the other listeners.
        try:
            said = asleep is None or asleep()
        except BaseException:
            listener.close()
            raise
        if not said:
            listener.close()
            return False
        with self._lock:
            self._listeners[database_id] = listener
            self._selector.register(listener, selectors.EVENT_READ, (_LISTENER, database_id))
            if self._thread is None:
                _raise_descriptor_limit()
                self._thread = threading.Thread(target=self._serve, name="dbprov-sleepers", daemon=True)
                self._thread.start()
        log.info("database %s: sleeping; port %s held", database_id, port)
        return True

    def holds(self, database_id: str) -> bool:
        return database_id in self._listeners

    def release(self, database_id: str) -> None:
        """Give the port back. Whatever came meanwhile waits for ``take``; it
        came while the database slept, so it is served by the wake."""
        with self._lock:
            self._refused.pop(database_id, None)
            listener = self._listeners.pop(database_id, None)
            if listener is None:
                return
            self._selector.unregister(listener)
            self._accept_all(database_id, listener)
            listener.close()
            for client, (owner, _) in list(self._unproven.items()):
                if owner == database_id:
                    self._prove(client, database_id)
            waiting = bool(self._waiting.get(database_id))
        if waiting:
            # Released by a step of the reconciler's own (a start, a reset, a
            # stop): its wake thread serves or refuses them.
            self._on_connect(database_id)

    def take(self, database_id: str) -> tuple[list[socket.socket], float | None]:
        """The connections waiting for the database, and since when the first waits."""
        with self._lock:
            return self._waiting.pop(database_id, []), self._since.pop(database_id, None)

    def waiting(self, database_id: str) -> bool:
        return bool(self._waiting.get(database_id))

    def waiting_since(self, database_id: str) -> float | None:
        """When the first connection still waiting came (``time.monotonic``)."""
        return self._since.get(database_id)

    def count(self) -> int:
        return len(self._listeners)

    def close(self) -> None:
        """Every port given back and every connection held closed (a client
        sees a closed connection, as from a server that went away)."""
        self._stopping.set()
        with self._lock:
            for listener in self._listeners.values():
                self._selector.unregister(listener)
                listener.close()
            for client in self._unproven:
                self._selector.unregister(client)
                client.close()
            for clients in self._waiting.values():
                for client in clients:
                    client.close()
            self._listeners.clear()
            self._unproven.clear()
            self._waiting.clear()
            self._since.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._selector.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                self._serve_once()
            except Exception:  # noqa: BLE001 - this thread serves every sleeping database
                log.exception("sleeping databases' listeners: unexpected error")
                time.sleep(0.5)

    def _serve_once(self) -> None:
        try:
            ready = self._selector.select(timeout=0.5)
        except OSError:
            return  # a socket closed under the select: the next one sees the rest
        woken, starved = set(), False
        with self._lock:
            for key, _ in ready:
                kind, database_id = key.data
                if kind == _LISTENER:
                    if self._listeners.get(database_id) is key.fileobj:  # else released meanwhile
                        starved |= self._accept_all(database_id, key.fileobj)
                elif key.fileobj in self._unproven and self._first_bytes(key.fileobj, database_id):
                    woken.add(database_id)
            deadline = time.monotonic() - _FIRST_BYTES_WITHIN
            for client, (_, came) in list(self._unproven.items()):
                if came < deadline:
                    self._drop(client)
        for database_id in woken:
            self._on_connect(database_id)
        if starved:
            time.sleep(0.1)  # out of descriptors: accepting again at once would only spin

    def _accept_all(self, database_id: str, listener: socket.socket) -> bool:
        """Under the lock: every queued connection accepted; True if out of descriptors."""
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                log.warning("database %s: accept failed: %s", database_id, exc)
                return True
            held = len(self._waiting.get(database_id, ())) + sum(
                owner == database_id for owner, _ in self._unproven.values()
            )
            if held >= MAX_WAITING:
                client.close()
                continue
            client.setblocking(False)
            self._unproven[client] = (database_id, time.monotonic())
            self._selector.register(client, selectors.EVENT_READ, (_CLIENT, database_id))

    def _first_bytes(self, client: socket.socket, database_id: str) -> bool:
        """Under the lock: whether the client's first bytes, now readable, are a
        PostgreSQL client's (it then waits for the wake); if not, it is closed."""
        try:
            head = client.recv(8, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            head = b""
        if len(head) < 8:
            if not head:
                self._drop(client)  # closed before it said anything
            return False
        if not is_first_packet(head):
            self._drop(client)
            return False
        self._prove(client, database_id)
        return True

    def _prove(self, client: socket.socket, database_id: str) -> None:
        """Under the lock: an accepted connection made one that waits for the wake."""
        del self._unproven[client]
        self._selector.unregister(client)
        client.setblocking(True)
        self._waiting.setdefault(database_id, []).append(client)
        self._since.setdefault(database_id, time.monotonic())

    def _drop(self, client: socket.socket) -> None:
        del self._unproven[client]
        self._selector.unregister(client)
        client.close()


def _stop_and_listen(stop: Callable[[], None], address: str, port: int) -> socket.socket | None:
    """``stop()`` on a thread, and a listener on the port as soon as it is
    free, tried every 2 ms until the stop is over; None if it is still taken
    then. The stop's error, if any, is raised once it is over."""
    failed: list[BaseException] = []

    def stopping() -> None:
        try:
            stop()
        except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=stopping, name="dbprov-sleepers-stop", daemon=True)
    thread.start()
    # One socket whose bind is tried again: a socket made for each try cost
    # twice the CPU (5.4 % of a core against 2.6 % while a stop lasts), and
    # the stops of a pass run side by side.
    unbound, listener = _unbound(address), None
    while listener is None:
        over = not thread.is_alive()
        try:
            unbound.bind((address, port))
            # Listening at once: a client that comes while the stop goes on waits in the backlog.
            listener = _listening(unbound)
        except OSError:
            if over:
                unbound.close()
                break
            time.sleep(0.002)
    thread.join()
    if failed:
        if listener is not None:
            listener.close()
        raise failed[0]
    return listener


def _listen(address: str, port: int) -> socket.socket:
    """A listening socket where the engine publishes: IPv4, IPv6, or both for ``::``."""
    listener = _unbound(address)
    try:
        listener.bind((address, port))
    except OSError:
        listener.close()
        raise
    return _listening(listener)


def _unbound(address: str) -> socket.socket:
    """A socket for ``address`` set up as ``socket.create_server`` sets one up, not yet bound."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        dual = address == "::" and socket.has_dualstack_ipv6()
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
    return listener


def _listening(listener: socket.socket) -> socket.socket:
    listener.listen(_BACKLOG)
    listener.setblocking(False)
    return listener


def relay(client: socket.socket, address: tuple[str, int], name: str) -> None:
    """Join ``client`` to the server at ``address`` until either side closes.

    Two threads per connection: only connections that came while a database
    slept are relayed, and those are few.
    """
    try:
        upstream = socket.create_connection(address, timeout=10)
    except OSError as exc:
        log.warning("%s: relay to %s:%s failed: %s", name, *address, exc)
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A peer that vanishes without a word (a machine gone) ends the relay
        # in minutes, not never: otherwise its server counts a client for good.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    done = threading.Barrier(2, action=lambda: (client.close(), upstream.close()))
    for source, target in ((client, upstream), (upstream, client)):
        threading.Thread(target=_pump, args=(source, target, done), name=f"{name}-relay", daemon=True).start()


def _pump(source: socket.socket, target: socket.socket, done: threading.Barrier) -> None:
    try:
        while True:
            data = source.recv(_RELAY_CHUNK)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    try:
        # The other direction may still have an answer to deliver.
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        done.wait(timeout=3600 * 24 * 365)
    except threading.BrokenBarrierError:
        pass


def _raise_descriptor_limit() -> None:
    """A descriptor per sleeping database: the soft limit (often 1,024) raised to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("descriptor limit stays at %s: %s", soft, exc)
