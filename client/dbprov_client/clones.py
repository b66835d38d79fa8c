"""Databases for tests inside one PostgreSQL server, each a clone of a template
database (``CREATE DATABASE ... TEMPLATE``), made ahead by background threads
so that handing one out is taking it from a queue, as IntegreSQL does.

A database given back is checked by another thread: one nothing was written
to is handed out again, one that was written to is dropped. Written to means,
once every session of the database has ended (each ends by flushing its
statistics: PostgreSQL 15 and later), that one of these changed since the
database was handed out:

- the rows inserted, updated and deleted in it, system catalogs included
  (``pg_stat_database``): data, and every DDL statement; rolled back writes
  count too;
- its ``pg_database`` row, its settings (``ALTER DATABASE ... SET``) and its
  comment, which live in the server's shared catalogs;
- the blocks of its sequences read (``pg_statio_all_sequences``): a
  ``nextval`` changes no row.

Before PostgreSQL 15 statistics arrive late, so every database given back is
dropped.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from .models import Database

log = logging.getLogger("dbprov_client.clones")

# The database's own counters and the shared catalogs' rows about it.
_STATE = """
SELECT s.tup_inserted + s.tup_updated + s.tup_deleted, d.xmin::text,
       (SELECT pg_catalog.array_agg(r.setconfig::text ORDER BY r.setrole)
          FROM pg_catalog.pg_db_role_setting r WHERE r.setdatabase = d.oid),
       pg_catalog.shobj_description(d.oid, 'pg_database')
FROM pg_catalog.pg_database d JOIN pg_catalog.pg_stat_database s ON s.datid = d.oid
WHERE d.datname = %s
"""
# Read inside the database itself: sequences' statistics are per database.
_SEQUENCES = "SELECT coalesce(sum(blks_read + blks_hit), 0) FROM pg_catalog.pg_statio_all_sequences"
# The tenant may end only its own sessions; autovacuum's end with a drop.
_END_SESSIONS = """
SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()
"""


def psycopg_module() -> Any:
    try:
        import psycopg
        import psycopg.sql
    except ImportError:
        raise RuntimeError(
            "dbprov: this needs psycopg, which is not installed: `pip install psycopg[binary]`"
        ) from None
    return psycopg


@dataclass(frozen=True)
class Clone:
    """A database of its own for one test, inside the server ``server``."""

    database: str
    connection_uri: str = field(repr=False)
    host: str | None
    port: int | None
    username: str | None
    password: str | None = field(repr=False)
    server: "Database | None" = field(default=None, repr=False)


@dataclass
class _Entry:
    name: str
    #: Its row of _STATE when it was made.
    state: tuple


def copy_strategy(version: int, syncs: bool) -> str:
    """How ``CREATE DATABASE`` copies the template on a server of ``version``
    (``server_version_num``) that does, or does not, sync its writes (fsync).

    Where it syncs: 15's default, every page of the copy written to the WAL,
    rather than a copy of the files with a checkpoint before and after (the
    only way before 15). With the drops on a thread of their own, a copy then
    never waits on a checkpoint. Where it does not (dbprov_db's server, not
    durable), a checkpoint costs next to nothing, and copying the files costs
    less than writing every page to the WAL: a suite in which one test in
    four writes took 1.48x a shared database's time against 1.79x
    (docs/performance.md).
    """
    if version < 150000:
        return ""
    return " STRATEGY WAL_LOG" if syncs else " STRATEGY FILE_COPY"


class Clones:
    """Clones of the database that ``uri`` names, ``ahead`` of them kept ready.

    ``take()`` hands one out, ``give_back()`` returns it; ``close()`` stops
    the threads and leaves the databases to the server's deletion.

    Threads, each with a session of its own, all in ``postgres``: a copy is
    made only of a database no other session is in, and nobody is in the
    template once they start.

    - ``makers`` make databases, side by side: a copy waits on the server's
      disk (its checkpoints) as much as it works. With two, a suite in which
      every test writes found a database ready when it asked (p50 0.2 ms
      against 13.2 ms with one; docs/performance.md).
    - One checks the databases given back, so that a clean one is back in
      the queue while a copy is being made.
    - One drops the written-to ones: a drop is a checkpoint, which waits on
      the server's disk for everything written since the last, seconds on a
      slow disk; the copies do not wait for it.
    """

    def __init__(self, uri: str, *, ahead: int = 4, prefix: str = "pytest", makers: int = 2,
                 server: "Database | None" = None, backlog: int = 128, timeout: float = 300) -> None:
        self._psycopg = psycopg_module()
        self.uri = uri
        self.template = unquote(urlsplit(uri).path.lstrip("/"))
        self.ahead = max(1, ahead)
        self.prefix = prefix
        self.server = server
        #: Dirty databases that may wait to be dropped while clones are made.
        #: Each drop is a checkpoint of its own, waiting on the server's disk,
        #: which the copies under way need too. So drops wait until the queue
        #: is full, or until this many hold their disk; whatever waits at the
        #: end goes with the server.
        self.backlog = backlog
        self.timeout = timeout
        self.made = self.recycled = self.dropped = 0
        self._count = self._checking = self._making = 0
        self._ready: collections.deque[_Entry] = collections.deque()
        self._returned: collections.deque[_Entry] = collections.deque()
        self._dirty: collections.deque[str] = collections.deque()
        self._out: dict[str, _Entry] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        # The one session in the template, which leaves before the copies
        # start; it leaves the template's catalog cache file (pg_internal.init)
        # built, for each copy of the files to carry.
        with self._psycopg.connect(uri, autocommit=True, connect_timeout=10) as conn:
            version = conn.info.server_version
            self._strategy = copy_strategy(version, conn.execute("SHOW fsync").fetchone()[0] == "on")
            self._sequences = conn.execute(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_class WHERE relkind = 'S')").fetchone()[0]
        self.recycling = version >= 150000
        # The checker's and the dropper's own, made on their first use.
        self._checking_conn: Any = None
        self._dropping_conn: Any = None
        workers = [(f"maker-{n}", self._make_ahead) for n in range(max(1, makers))]
        workers += [("dropper", self._drop_dirty), ("checker", self._check_returned)]
        self._threads = [threading.Thread(target=self._guarded, args=(work,), name=f"dbprov-clones-{name}",
                                          daemon=True) for name, work in workers]
        for thread in self._threads:
            thread.start()

    # -- the tests' side ---------------------------------------------------

    def take(self) -> Clone:
        """A database no test has written to: at once when one is ready."""
        deadline = time.monotonic() + self.timeout
        with self._changed:
            while not self._ready:
                if self._error is not None:
                    raise RuntimeError(f"dbprov: could not make test databases: {self._error}") from self._error
                if self._closed:
                    raise RuntimeError("dbprov: the test databases are closed")
                if not self._changed.wait(deadline - time.monotonic()):
                    raise TimeoutError(f"dbprov: no test database ready after {self.timeout:.0f} s")
            entry = self._ready.popleft()
            self._out[entry.name] = entry
            self._changed.notify_all()
        return self._clone(entry.name)

    def give_back(self, clone: Clone) -> None:
        """Returns ``clone``: it is checked, then handed out again or dropped, in the background."""
        with self._changed:
            self._returned.append(self._out.pop(clone.database))
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)
        for conn in (self._checking_conn, self._dropping_conn):
            if conn is not None:
                conn.close()
        log.info("dbprov: %d test databases made, %d handed out again, %d dropped",
                 self.made, self.recycled, self.dropped)

    def _clone(self, name: str) -> Clone:
        parts = urlsplit(self.uri)
        return Clone(
            database=name,
            connection_uri=parts._replace(path="/" + name).geturl(),
            host=parts.hostname, port=parts.port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            server=self.server,
        )

    def _sql(self, statement: str, *names: str) -> Any:
        sql = self._psycopg.sql
        return sql.SQL(statement).format(*(sql.Identifier(name) for name in names))

    # -- the threads -------------------------------------------------------

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the tests waiting for a database
            log.exception("dbprov: %s failed", threading.current_thread().name)
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def _make_ahead(self) -> None:
        with self._to_postgres() as conn:
            while True:
                with self._changed:
                    while not self._closed and self._full():
                        self._changed.wait()
                    if self._closed:
                        return
                    self._making += 1
                    self._count += 1
                    name = f"{self.prefix}_{self._count}"
                entry = None
                try:
                    entry = self._make(conn, name)
                finally:
                    # In one step: between two, the other maker would count
                    # this copy neither made nor under way, and make one more.
                    with self._changed:
                        self._making -= 1
                        if entry is not None:
                            self.made += 1
                            self._ready.append(entry)
                        self._changed.notify_all()

    def _drop_dirty(self) -> None:
        while True:
            with self._changed:
                while not self._closed and not (
                    self._dirty and (self._full() or len(self._dirty) >= self.backlog)
                ):
                    self._changed.wait()
                if self._closed:
                    return
                name = self._dirty.popleft()
            self._drop(name)

    def _full(self) -> bool:
        """Whether ``ahead`` databases are ready. Those given back count as
        ready until checked: a copy stalls the server's disk for the tests
        meanwhile, and in a suite that mostly reads most come back clean, a
        few milliseconds later."""
        return len(self._ready) + len(self._returned) + self._checking + self._making >= self.ahead

    def _check_returned(self) -> None:
        while True:
            with self._changed:
                while not self._closed and not self._returned:
                    self._changed.wait()
                if self._closed:
                    return
                entry = self._returned.popleft()
                self._checking += 1
            self._check(entry)

    def _make(self, conn: Any, name: str) -> _Entry:
        conn.execute(self._sql("CREATE DATABASE {} TEMPLATE {}" + self._strategy, name, self.template))
        # A test database is thrown away after the test, and the server with
        # it: its commits need not wait for the disk, which the copies and
        # drops keep busy (a suite in which one test in four writes: the
        # tests' own time 4.8 s against 8.2 s).
        conn.execute(self._sql("ALTER DATABASE {} SET synchronous_commit = off", name))
        if self._strategy == " STRATEGY WAL_LOG":
            # Its first session builds the catalog cache file (pg_internal.init)
            # that a copy of the pages does not carry, as a copy of the files
            # does: that session is this one, not the test's. Only a saving: a
            # server that refuses it (full, say) still gets its clone.
            try:
                self._psycopg.connect(self._clone(name).connection_uri, connect_timeout=10).close()
            except self._psycopg.Error as exc:
                log.debug("dbprov: no first session for test database %s: %s", name, exc)
        return _Entry(name, self._state(conn, name))

    def _check(self, entry: _Entry) -> None:
        clean = False
        if self.recycling:
            try:
                conn = self._checker()
                clean = self._sessions_ended(conn, entry.name) and self._state(conn, entry.name) == entry.state
                if clean and self._sequences:
                    # Sequences' statistics are per database: asked inside it.
                    with self._psycopg.connect(self._clone(entry.name).connection_uri, autocommit=True,
                                               connect_timeout=10) as inside:
                        # A new database's statistics start at zero, and a clean one's stay there.
                        clean = inside.execute(_SEQUENCES).fetchone()[0] == 0
            except self._psycopg.Error as exc:
                # Made anew for the next check, whatever state this one is in.
                if self._checking_conn is not None:
                    self._checking_conn.close()
                    self._checking_conn = None
                log.warning("dbprov: could not check test database %s, dropping it: %s", entry.name, exc)
        with self._changed:
            self._checking -= 1
            if clean:
                self.recycled += 1
                # First out again: the fewer databases in use, the more of them the server's cache holds.
                self._ready.appendleft(entry)
            else:
                self._dirty.append(entry.name)
            self._changed.notify_all()

    def _checker(self) -> Any:
        """The checker thread's session, kept: the sessions and counters it asks
        about are the server's, readable from any database. In ``postgres``,
        which every dbprov server has, rather than a new session in each
        database given back (a connection each, most of what a check cost)."""
        if self._checking_conn is None or self._checking_conn.closed:
            self._checking_conn = self._to_postgres()
        return self._checking_conn

    def _to_postgres(self) -> Any:
        parts = urlsplit(self.uri)
        return self._psycopg.connect(parts._replace(path="/postgres").geturl(), autocommit=True, connect_timeout=10)

    @staticmethod
    def _sessions_ended(conn: Any, name: str, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while conn.execute(_END_SESSIONS, (name,)).fetchall():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    @staticmethod
    def _state(conn: Any, name: str) -> tuple:
        return tuple(conn.execute(_STATE, (name,)).fetchone() or ())

    def _drop(self, name: str) -> None:
        try:
            if self._dropping_conn is None or self._dropping_conn.closed:
                self._dropping_conn = self._to_postgres()
            self._dropping_conn.execute(self._sql("DROP DATABASE IF EXISTS {} WITH (FORCE)", name))
        except self._psycopg.Error as exc:
            # Made anew for the next drop, whatever state this one is in.
            if self._dropping_conn is not None:
                self._dropping_conn.close()
                self._dropping_conn = None
            log.warning("dbprov: could not drop test database %s: %s", name, exc)
            return
        with self._changed:
            self.dropped += 1
