"""Coordination between processes sharing one metadata store.

Claims: which reconciler works on a database right now. Slots: how many of
a kind of work (a tenant's dumps, say) run at once. Change feed: telling
other processes that a record changed, so they need not poll.

Why per-record PostgreSQL advisory locks for claims: a session-level advisory
lock is held by a connection and released by the server the moment that
connection ends, so a worker that crashes or is cut off frees its claims with
no lease, clock or sweeper; work spreads over every worker (unlike a single
leader); and unlike ``SELECT ... FOR UPDATE`` it does not block the row, so the
claimant can record progress in short transactions that API readers see at
once. Deterministic container names are the second line of defence: even two
claimants could never create two containers for one database.

SQLite serves one machine: there, claims are held in the process, and one
reconciler process per store is enforced with a file lock.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator, Protocol

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from ..errors import DbprovError
from .engine import CHANNEL, Store
from .notify import Notifier

log = logging.getLogger(__name__)

# First key of the two-key advisory lock form: "dbpv", so dbprov's locks
# cannot collide with an application's single-key locks.
_LOCK_CLASS = 0x64627076


class Claims(Protocol):
    def hold(self, database_id: str) -> AbstractContextManager[bool]:
        """Yields True while this process may work on the database, else False."""


class LocalClaims:
    """Claims among the threads of one process."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, database_id: str) -> Iterator[bool]:
        with self._lock:
            if database_id in self._held:
                claimed = False
            else:
                self._held.add(database_id)
                claimed = True
        try:
            yield claimed
        finally:
            if claimed:
                with self._lock:
                    self._held.discard(database_id)


class AdvisoryLockClaims:
    """Claims across processes and hosts: a PostgreSQL advisory lock per database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @contextmanager
    def hold(self, database_id: str) -> Iterator[bool]:
        key = {"cls": _LOCK_CLASS, "id": database_id}
        with self.store.connection() as connection:
            claimed = connection.scalar(
                text("SELECT pg_try_advisory_lock(:cls, hashtext(:id))"), key
            )
            connection.commit()
            try:
                yield bool(claimed)
            finally:
                if claimed:
                    try:
                        connection.execute(
                            text("SELECT pg_advisory_unlock(:cls, hashtext(:id))"), key
                        )
                        connection.commit()
                    except Exception:  # noqa: BLE001 - the lock must not outlive us
                        # Closing the connection for good releases the lock too.
                        connection.invalidate()


def claims_for(store: Store) -> LocalClaims | AdvisoryLockClaims:
    return AdvisoryLockClaims(store) if store.is_postgres else LocalClaims()


class Slots(Protocol):
    def hold(self, name: str, count: int) -> AbstractContextManager[bool]:
        """Yields True while this process holds one of ``count`` slots called
        ``name`` (say, a tenant's running dumps) across every process of the
        store, else False: all are taken."""


class AdvisoryLockSlots:
    """Slots across processes and hosts: slot i of a name is a claim of "name#i",
    held and freed as claims are (a crashed holder frees its slot)."""

    def __init__(self, claims: AdvisoryLockClaims) -> None:
        self._claims = claims

    @contextmanager
    def hold(self, name: str, count: int) -> Iterator[bool]:
        for slot in range(count):
            with self._claims.hold(f"{name}#{slot}") as mine:
                if mine:
                    yield True
                    return
        yield False


class FileLockSlots:
    """Slots among the processes of one machine, which is what SQLite serves:
    a file lock per slot, freed by the kernel when its holder ends."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @contextmanager
    def hold(self, name: str, count: int) -> Iterator[bool]:
        self._directory.mkdir(parents=True, exist_ok=True)
        for slot in range(count):
            with open(self._directory / f"{name}.{slot}.lock", "w") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                yield True
                return
        yield False


def slots_for(store: Store, data_dir: Path) -> Slots:
    if store.is_postgres:
        return AdvisoryLockSlots(AdvisoryLockClaims(store))
    return FileLockSlots(data_dir / "slots")


class ReconcilerBusy(DbprovError):
    """Another process reconciles the store, and only one may."""


@contextmanager
def single_reconciler(store: Store, data_dir: Path, exclusive: bool = False) -> Iterator[None]:
    """Make sure no other process reconciles the same store, where only one may;
    ``ReconcilerBusy`` if one does.

    On SQLite only one ever may (a file lock). On PostgreSQL several may, each
    taking databases as it claims them, unless ``exclusive``: servers publish
    their ports on this machine, and the process that holds a sleeping
    database's port must be the one that wakes, stops or removes it (an
    advisory lock, freed by the server when its holder ends).
    """
    if store.is_postgres:
        if not exclusive:
            yield
            return
        with AdvisoryLockClaims(store).hold("dbprov-reconciler") as mine:
            if not mine:
                raise ReconcilerBusy("another dbprov reconciler holds this store's sleeping databases")
            yield
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "reconciler.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReconcilerBusy(
                f"another dbprov reconciler is running on {data_dir}; with SQLite only one may"
            ) from None
        yield


class ChangeListener:
    """LISTENs for the store's change notifications and nudges local waiters."""

    def __init__(self, store: Store, wanted: Notifier, changed: Notifier) -> None:
        url = make_url(store.url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._wanted = wanted
        self._changed = changed
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dbprov-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    # Something may have changed while we were not listening.
                    self._nudge()
                    while not self._stopping.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            self._nudge(notice.payload)
            except psycopg.Error as exc:
                log.warning("change feed interrupted (%s); listening again in %.1f s", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _nudge(self, wake_in: str = "") -> None:
        """Waiting requests look again at once; the reconciler now, or when
        the notice says (``Store.announce``)."""
        if wake_in:
            self._wanted.notify_in(float(wake_in))
        else:
            self._wanted.notify()
        self._changed.notify()
