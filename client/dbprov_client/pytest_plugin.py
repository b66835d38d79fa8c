"""pytest fixtures that give tests their own dbprov databases.

Registered through the ``pytest11`` entry point: installing dbprov-client is
the whole setup.

- ``dbprov_database``: a fresh database for each test, deleted after it.
- ``dbprov_database_session``: one database for the whole session (per xdist worker).
- ``dbprov_db``: a database of its own for each test inside one server for
  the session (per xdist worker; not durable unless ``dbprov_create_options``
  says ``"durable": True``): a clone of the server's migrated database,
  taken from a queue that background threads keep filled; given back, it
  is handed out again if nothing was written to it, dropped otherwise.
- ``dbprov_client``: the session's :class:`dbprov_client.Client`.
- ``dbprov_create_options``: what each create asks for (``{"version": "17"}``,
  a plan, extensions ...); override it in a conftest.py.
- ``dbprov_template``: with ``--dbprov-migrations DIR`` (or the ini option
  ``dbprov_migrations``), the server template whose key is a hash of the
  folder's files, built once (by ``dbprov_template_build``) whichever process
  asks first; every ``dbprov_database``, and ``dbprov_db``'s server, is then a
  clone of it.
- ``dbprov_template_build``: a callable given the template's connection URI;
  by default it runs the folder's ``*.sql`` files in name order with psycopg.

Options: ``--dbprov-url`` and ``--dbprov-token`` (default DBPROV_URL and
DBPROV_TOKEN, then what ``dbprov login`` stored) and ``--dbprov-ttl`` (default
10m). Every database is created with that expiry lease, and a background thread
renews the leases of the databases the session holds every third of it: a test
run that is killed leaves databases that the server deletes once their lease
runs out. Under pytest-xdist each worker has its own databases, named
``pytest-<run>-<worker>-<n>``. ``--dbprov-db-ahead`` (default 4) and
``--dbprov-db-backlog`` (default 128) tune ``dbprov_db``: the clones kept
ready, and the written-to ones that may wait to be dropped.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .client import Client
    from .clones import Clone, Clones
    from .models import Database, Template

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
    group.addoption("--dbprov-migrations", default=None, metavar="DIR",
                    help="a migrations folder: its hash names a server template, built once, "
                         "and each dbprov_database is a clone of it (ini: dbprov_migrations)")
    group.addoption("--dbprov-template-pool", default=None, type=int, metavar="N",
                    help="warm clones the server keeps for the template (default 0; "
                         "ini: dbprov_template_pool)")
    group.addoption("--dbprov-db-ahead", default=None, type=int, metavar="N",
                    help="dbprov_db: clones kept ready in the session's server (default 4; ini: dbprov_db_ahead)")
    group.addoption("--dbprov-db-backlog", default=None, type=int, metavar="N",
                    help="dbprov_db: written-to clones that may wait to be dropped while clones are made "
                         "(default 128; ini: dbprov_db_backlog)")
    parser.addini("dbprov_migrations", type="paths", default=[],
                  help="dbprov: a migrations folder whose hash names the template each test's database "
                       "is a clone of (relative to the ini file)")
    parser.addini("dbprov_template_pool", default="0",
                  help="dbprov: warm clones the server keeps for the template")
    parser.addini("dbprov_db_ahead", default="4", help="dbprov_db: clones kept ready in the session's server")
    parser.addini("dbprov_db_backlog", default="128",
                  help="dbprov_db: written-to clones that may wait to be dropped while clones are made")


def pytest_configure(config: pytest.Config) -> None:
    migrations_folder(config)  # a folder that is not there stops the run before any test


def migrations_folder(config: pytest.Config) -> Path | None:
    """The folder of ``--dbprov-migrations`` (relative to where pytest was started)
    or of the ini option ``dbprov_migrations`` (relative to the ini file)."""
    given = config.getoption("dbprov_migrations")
    if given:
        folder = config.invocation_params.dir / given
    else:
        paths = config.getini("dbprov_migrations")
        if not paths:
            return None
        folder = Path(paths[0])
    if not folder.is_dir():
        raise pytest.UsageError(f"dbprov migrations: {folder} is not a folder")
    return folder.resolve()


def _files(folder: Path) -> list[Path]:
    """The folder's files, its subfolders' too, sorted by their path in it;
    hidden files and __pycache__ left out."""
    return sorted(
        (path for path in folder.rglob("*")
         if path.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                       for part in path.relative_to(folder).parts)),
        key=lambda path: path.relative_to(folder).as_posix(),
    )


def template_key(folder: Path, version: str | None = None) -> str:
    """``sha256:`` and the hash of the folder's files, names and contents, in
    name order (and of the PostgreSQL version, when one is asked for): the same
    migrations give the same key in every run and on every machine."""
    digest = hashlib.sha256()
    for path in _files(folder):
        name = path.relative_to(folder).as_posix().encode()
        content = path.read_bytes()
        digest.update(b"%d:%s%d:" % (len(name), name, len(content)))
        digest.update(content)
    if version:
        digest.update(b"version:" + str(version).encode())
    return "sha256:" + digest.hexdigest()


def _setting(config: pytest.Config, name: str) -> int:
    given = config.getoption(name)
    return int(config.getini(name) or 0) if given is None else given


def run_sql_files(folder: Path, uri: str) -> None:
    """Run every ``*.sql`` file of ``folder`` in name order, each in a transaction of its own."""
    try:
        import psycopg
    except ImportError:
        raise RuntimeError(
            "dbprov: building the template runs the migrations' *.sql files with psycopg, which is "
            "not installed: `pip install psycopg[binary]`, or override the fixture "
            "dbprov_template_build to migrate the database your own way"
        ) from None
    scripts = sorted(folder.glob("*.sql"))
    if not scripts:
        raise RuntimeError(f"dbprov: no *.sql file in {folder}; override the fixture dbprov_template_build "
                           "to migrate the database your own way")
    with psycopg.connect(uri, autocommit=True, connect_timeout=10) as conn:
        for script in scripts:
            log.info("template: running %s", script.name)
            with conn.transaction():
                conn.execute(script.read_text())


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


@pytest.fixture(scope="session")
def dbprov_migrations(pytestconfig: pytest.Config) -> Path | None:
    """The migrations folder of ``--dbprov-migrations`` or ``dbprov_migrations``, or None."""
    return migrations_folder(pytestconfig)


@pytest.fixture(scope="session")
def dbprov_template_build(dbprov_migrations: Path | None) -> Callable[[str], Any]:
    """What fills the template, called once with its connection URI by whichever
    process builds it. By default: every ``*.sql`` file of the migrations folder,
    in name order, with psycopg. Override it to migrate your own way::

        @pytest.fixture(scope="session")
        def dbprov_template_build():
            def build(uri):
                subprocess.run(["alembic", "upgrade", "head"], check=True,
                               env={**os.environ, "DATABASE_URL": uri})
            return build
    """

    def build(uri: str) -> None:
        if dbprov_migrations is None:
            raise RuntimeError("dbprov: no migrations folder (--dbprov-migrations or dbprov_migrations)")
        run_sql_files(dbprov_migrations, uri)

    return build


@pytest.fixture(scope="session")
def dbprov_template(
    dbprov_client: "Client",
    dbprov_migrations: Path | None,
    dbprov_template_build: Callable[[str], Any],
    dbprov_create_options: dict[str, Any],
    pytestconfig: pytest.Config,
) -> "Template | None":
    """The ready template for the migrations folder (None without one): built
    once by whichever process (xdist worker, CI job) asks first, while the others
    wait for it; kept on the server, so a later run with the same migrations
    clones it at once."""
    if dbprov_migrations is None:
        return None
    pool = _setting(pytestconfig, "dbprov_template_pool")
    version = dbprov_create_options.get("version")
    key = template_key(dbprov_migrations, version)
    return dbprov_client.template(key, version, build=dbprov_template_build, pool_size=pool)


def _options(options: dict[str, Any], template: "Template | None") -> dict[str, Any]:
    return {**options, "template": template.key} if template is not None else options


@pytest.fixture
def dbprov_database(
    dbprov_leases: Leases, dbprov_create_options: dict[str, Any], dbprov_template: "Template | None"
) -> Iterator["Database"]:
    """A fresh database for this test: connect with ``.connection_uri``; deleted
    after the test. A clone of the template when there is a migrations folder."""
    database = dbprov_leases.create(_options(dbprov_create_options, dbprov_template))
    yield database
    dbprov_leases.release(database)


@pytest.fixture(scope="session")
def dbprov_database_session(
    dbprov_leases: Leases, dbprov_create_options: dict[str, Any], dbprov_template: "Template | None"
) -> Iterator["Database"]:
    """One database for the whole session (each xdist worker has its own)."""
    database = dbprov_leases.create(_options(dbprov_create_options, dbprov_template))
    yield database
    dbprov_leases.release(database)


@pytest.fixture(scope="session")
def dbprov_db_clones(
    dbprov_leases: Leases, dbprov_create_options: dict[str, Any], dbprov_template: "Template | None",
    pytestconfig: pytest.Config,
) -> Iterator["Clones"]:
    """The session's server for ``dbprov_db`` (each xdist worker has its own),
    a clone of the template when there is a migrations folder, and the clones
    of its database made in it (``.server`` is its record). Nobody may connect
    to the server's own database: it is the template of every clone."""
    from .clones import Clones

    # Not durable unless the options say so: what it holds is the session's,
    # made again by the next run, and a server that does not sync makes and
    # drops the clones faster (each DROP DATABASE costs a checkpoint).
    options = {"durable": False, **dbprov_create_options}
    server = dbprov_leases.create(_options(options, dbprov_template))
    try:
        clones = Clones(server.connection_uri, ahead=_setting(pytestconfig, "dbprov_db_ahead"),
                        backlog=_setting(pytestconfig, "dbprov_db_backlog"),
                        prefix=dbprov_leases.prefix.replace("-", "_"), server=server)
    except BaseException:
        dbprov_leases.release(server)
        raise
    yield clones
    clones.close()
    dbprov_leases.release(server)


@pytest.fixture
def dbprov_db(dbprov_db_clones: "Clones") -> Iterator["Clone"]:
    """A database of its own for this test (``.connection_uri``, ``.database``,
    ``.host``, ``.port``, ``.username``, ``.password``, ``.server``) in the
    session's server: a clone of the migrated database, ready before it is
    asked for. Handed out again after the test if nothing was written to it,
    dropped otherwise; the server, and whatever is left in it, is deleted at
    the end of the session."""
    clone = dbprov_db_clones.take()
    yield clone
    dbprov_db_clones.give_back(clone)
