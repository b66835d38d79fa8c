"""pytest fixtures that give tests their own dbprov databases.

Registered through the ``pytest11`` entry point: installing dbprov-client is
the whole setup.

- ``dbprov_database``: a fresh database for each test, deleted after it.
- ``dbprov_database_session``: one database for the whole session (per xdist worker).
- ``dbprov_client``: the session's :class:`dbprov_client.Client`.
- ``dbprov_create_options``: what each create asks for (``{"version": "17"}``,
  a plan, extensions ...); override it in a conftest.py.

Options: ``--dbprov-url`` and ``--dbprov-token`` (default DBPROV_URL and
DBPROV_TOKEN, then what ``dbprov login`` stored) and ``--dbprov-ttl`` (default
10m). Every database is created with that expiry lease, and a background thread
renews the leases of the databases the session holds every third of it: a test
run that is killed leaves databases that the server deletes once their lease
runs out. Under pytest-xdist each worker has its own databases, named
``pytest-<run>-<worker>-<n>``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .client import Client
    from .models import Database

log = logging.getLogger("dbprov_client.pytest")

DEFAULT_TTL = "10m"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dbprov", "dbprov databases (dbprov_database fixtures)")
    group.addoption("--dbprov-url", default=None, metavar="URL",
                    help="dbprov server (default: DBPROV_URL, or `dbprov login`'s, or http://127.0.0.1:8080)")
    group.addoption("--dbprov-token", default=None, metavar="TOKEN",
                    help="dbprov token (default: DBPROV_TOKEN, or `dbprov login`'s)")
    group.addoption("--dbprov-ttl", default=None, metavar="DURATION",
                    help=f"expiry lease of each database, renewed every third of it while "
                         f"tests run (default {DEFAULT_TTL})")


def _worker(config: pytest.Config) -> tuple[str, str]:
    """This run's id (shared by the xdist workers of one run) and this worker's."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput:
        return str(workerinput.get("testrunuid", ""))[:6] or uuid.uuid4().hex[:6], workerinput["workerid"]
    return uuid.uuid4().hex[:6], "main"


class Leases:
    """The session's databases: creates them with a lease, renews the leases in
    a background thread, deletes them."""

    def __init__(self, client: "Client", ttl: int, prefix: str) -> None:
        self.client = client
        self.ttl = ttl
        self.interval = max(1.0, ttl / 3)
        self.prefix = prefix
        self.held: dict[str, Database] = {}
        self.deleting: set[str] = set()
        self.renewals = 0
        self._count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def create(self, options: dict[str, Any]) -> "Database":
        from .errors import Refused

        with self._lock:
            self._count += 1
            name = f"{self.prefix}-{self._count}"
        arguments = {"ttl": self.ttl, **options, "name": name}
        try:
            database = self.client.create(**arguments)
        except Refused as exc:
            # Databases this session deleted count until they are gone.
            if not exc.type.endswith("quota-exceeded") or not self.deleting:
                raise
            self._settle_deletions()
            database = self.client.create(**arguments)
        with self._lock:
            self.held[database.id] = database
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew, name="dbprov-leases", daemon=True)
                self._thread.start()
        return database

    def release(self, database: "Database") -> None:
        from .errors import NotFound

        with self._lock:
            self.held.pop(database.id, None)
        try:
            self.client.delete(database.id)
        except NotFound:
            return
        self.deleting.add(database.id)

    def _settle_deletions(self) -> None:
        from .errors import ProblemError

        for database_id in list(self.deleting):
            try:
                self.client.wait_for(database_id, {"deleted"}, timeout=60)
            except ProblemError:
                pass
            self.deleting.discard(database_id)

    def _renew(self) -> None:
        from .errors import NotFound, ProblemError

        # Its own connections: requests' sessions are not shared between threads.
        client = self.client.copy()
        try:
            while not self._stop.wait(self.interval):
                with self._lock:
                    held = list(self.held)
                for database_id in held:
                    try:
                        client.renew(database_id, self.ttl)
                        self.renewals += 1
                    except NotFound:
                        with self._lock:
                            self.held.pop(database_id, None)
                    except ProblemError as exc:
                        log.warning("could not renew the lease of database %s: %s", database_id, exc)
        finally:
            client.close()

    def close(self) -> None:
        from .errors import ProblemError

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for database in list(self.held.values()):
            try:
                self.release(database)
            except ProblemError as exc:
                log.warning("could not delete database %s: %s", database.id, exc)


@pytest.fixture(scope="session")
def dbprov_client(pytestconfig: pytest.Config) -> Iterator["Client"]:
    """A :class:`dbprov_client.Client` for the server of ``--dbprov-url``."""
    from .client import Client

    client = Client(pytestconfig.getoption("dbprov_url"), pytestconfig.getoption("dbprov_token"))
    yield client
    client.close()


@pytest.fixture(scope="session")
def dbprov_create_options() -> dict[str, Any]:
    """What each database is created with: override it to name a version, plan,
    extensions or parameters, e.g. ``return {"version": "16", "extensions": ["citext"]}``."""
    return {}


@pytest.fixture(scope="session")
def dbprov_leases(dbprov_client: "Client", pytestconfig: pytest.Config) -> Iterator[Leases]:
    """The session's databases and the thread that renews their leases."""
    from .durations import parse_duration

    run, worker = _worker(pytestconfig)
    ttl = parse_duration(pytestconfig.getoption("dbprov_ttl") or DEFAULT_TTL)
    leases = Leases(dbprov_client, ttl, f"pytest-{run}-{worker}".lower())
    yield leases
    leases.close()


@pytest.fixture
def dbprov_database(dbprov_leases: Leases, dbprov_create_options: dict[str, Any]) -> Iterator["Database"]:
    """A fresh database for this test: connect with ``.connection_uri``; deleted after the test."""
    database = dbprov_leases.create(dbprov_create_options)
    yield database
    dbprov_leases.release(database)


@pytest.fixture(scope="session")
def dbprov_database_session(
    dbprov_leases: Leases, dbprov_create_options: dict[str, Any]
) -> Iterator["Database"]:
    """One database for the whole session (each xdist worker has its own)."""
    database = dbprov_leases.create(dbprov_create_options)
    yield database
    dbprov_leases.release(database)
