"""The client distribution against the real service (`dbprov serve --no-auth`)
and the real engine: the `dbprov` command as a shell user runs it, the Python
client's context manager, and the pytest plugin in a child pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from dbprov_client import Client, NotFound

from .conftest import free_port

pytestmark = pytest.mark.docker
pytest_plugins = ["pytester"]

DBPROV = str(Path(sys.executable).with_name("dbprov"))


@pytest.fixture
def shell(service, tmp_path):
    """Runs the installed `dbprov` console script against the service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBPROV_")}
    env.update(DBPROV_URL=service.url, XDG_CONFIG_HOME=str(tmp_path / "config"))

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([DBPROV, *args], env={**env, **extra}, capture_output=True,
                              text=True, timeout=180)

    return run


def connect(uri: str) -> psycopg.Connection:
    return psycopg.connect(uri, connect_timeout=5)


def test_new_wait_prints_a_uri_psql_can_use_and_rm_wait_removes_it(shell, service, docker_client):
    created = shell("new", "--wait", "--ttl", "10m", "--name", "shell")
    assert created.returncode == 0, created.stderr
    assert created.stderr == ""  # no terminal, no progress
    uri = created.stdout.splitlines()[-1]
    with connect(uri) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    (listed,) = [line for line in shell("ls").stdout.splitlines() if " shell " in line]
    database_id = listed.split()[0]
    assert shell("url", database_id).stdout.strip() == uri
    if shutil.which("psql"):
        result = shell("psql", database_id, "-tAc", "SELECT 40 + 2")
        assert result.returncode == 0 and result.stdout.strip() == "42", result.stderr

    assert shell("stop", database_id, "--wait").stdout == f"{database_id} stopped\n"
    assert shell("start", database_id).stdout == f"{database_id} ready\n"
    with connect(uri) as conn:
        conn.execute("SELECT 1")
    assert shell("renew", database_id, "--ttl", "1h").returncode == 0
    kinds = shell("events", database_id).stdout
    assert all(kind in kinds for kind in ("requested", "ready", "stopped", "started", "updated"))

    removed = shell("rm", database_id, "--wait")
    assert removed.returncode == 0 and removed.stdout == f"{database_id} deleted\n"
    assert not [c for c in docker_client.containers.list(all=True) if c.name == f"dbprov-{database_id}"]


def test_each_kind_of_error_has_its_exit_status(shell):
    missing = shell("show", "nosuchdatabase")
    assert (missing.returncode, missing.stdout) == (3, "")
    assert missing.stderr == "Error: Not found: no database with id 'nosuchdatabase'\n"
    refused = shell("new", "--version", "9")
    assert refused.returncode == 4
    assert refused.stderr.startswith("Error: Request validation failed: unsupported version '9'")
    unreachable = shell("ls", DBPROV_URL=f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 5
    assert unreachable.stderr.startswith("Error: Service unavailable: no answer from")


def test_the_context_manager_deletes_its_database(service):
    client = Client(service.url)
    with client.database(version="15", ttl=600) as db:
        with connect(db.connection_uri) as conn:
            assert conn.execute("SHOW server_version").fetchone()[0].startswith("15.")
        assert client.get(db.id).expires_at is not None
    service.wait_for_status(db.id, "deleted")


def test_a_create_answered_at_once_is_waited_for_with_its_key(service):
    """The command's terminal path: an asynchronous create, then the same
    create again, which the service answers once the database is ready."""
    client = Client(service.url)
    accepted = []
    database = client.create(ttl=600, on_accepted=accepted.append)
    assert accepted[0].id == database.id and database.status == "ready"
    with connect(database.connection_uri) as conn:
        conn.execute("SELECT 1")
    assert [d.id for d in client.list_all() if d.status != "deleted"] == [database.id]
    client.delete(database.id, wait=True)
    with pytest.raises(NotFound):
        client.delete("nosuchdatabase")


def test_the_pytest_plugin_gives_each_test_a_database_and_deletes_it(service, pytester, monkeypatch):
    ids = pytester.path / "ids.txt"
    pytester.makepyfile(test_suite=f"""
        import psycopg

        def record(database):
            with open({str(ids)!r}, "a") as file:
                file.write(database.id + "\\n")

        def test_one(dbprov_database):
            with psycopg.connect(dbprov_database.connection_uri, connect_timeout=5) as conn:
                conn.execute("CREATE TABLE t (x int)")
            record(dbprov_database)

        def test_two(dbprov_database):
            with psycopg.connect(dbprov_database.connection_uri, connect_timeout=5) as conn:
                # A fresh database: the other test's table is not in it.
                assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
            record(dbprov_database)
        """)
    monkeypatch.delenv("DBPROV_URL", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--dbprov-url={service.url}",
                                           timeout=300)
    result.assert_outcomes(passed=2)
    database_ids = ids.read_text().split()
    assert len(set(database_ids)) == 2
    for database_id in database_ids:
        service.wait_for_status(database_id, "deleted")


def test_the_plugin_renews_the_lease_while_a_test_runs(service, pytester, monkeypatch):
    """Created with a 3 s lease, the database outlives it while the test runs;
    the service expires what is not renewed every half second."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_lease="""
        import time
        import psycopg

        def test_long(dbprov_database):
            time.sleep(5)
            with psycopg.connect(dbprov_database.connection_uri, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        """)
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "dbprov_client.pytest_plugin",
        f"--dbprov-url={service.url}", "--dbprov-ttl=3s", timeout=120,
    )
    result.assert_outcomes(passed=1)
    assert time.monotonic() - started > 5


# -- data: snapshots, clones, resets, templates, dumps -----------------------------


def rows(uri: str, table: str = "item") -> list[int]:
    with connect(uri) as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


def test_snapshot_clone_and_reset_through_the_client_and_the_command(service, shell):
    client = Client(service.url)
    source = client.create(ttl=600)
    with connect(source.connection_uri) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
        conn.execute("INSERT INTO item VALUES (1)")
    taken = shell("snapshot", source.id, "--wait")
    assert taken.returncode == 0, taken.stderr
    snapshot_id = taken.stdout.strip()
    assert client.get_snapshot(snapshot_id).status == "ready"
    assert snapshot_id in shell("snapshots").stdout

    clone = client.create(from_snapshot=snapshot_id, ttl=600)
    assert clone.id != source.id and clone.connection_uri != source.connection_uri
    with connect(clone.connection_uri) as conn:
        conn.execute("INSERT INTO item VALUES (2)")
    assert rows(clone.connection_uri) == [1, 2] and rows(source.connection_uri) == [1]

    reset = client.reset(clone.id)
    assert reset.status == "ready" and rows(clone.connection_uri) == [1]
    with connect(source.connection_uri) as conn:
        conn.execute("DELETE FROM item")
    assert shell("reset", source.id, "--snapshot", snapshot_id).stdout == f"{source.id} ready\n"
    assert rows(source.connection_uri) == [1]
    copied = shell("new", "--from-database", clone.id, "--ttl", "10m")
    assert copied.returncode == 0, copied.stderr
    assert rows(copied.stdout.splitlines()[-1]) == [1]


def test_a_template_asked_for_by_two_clients_at_once_is_built_once(service):
    key = "sha256:client-concurrent"
    builds = []
    barrier = threading.Barrier(2)

    def build(uri):
        builds.append(uri)
        with connect(uri) as conn:
            conn.execute("CREATE TABLE migrated (id int PRIMARY KEY)")
            conn.execute("INSERT INTO migrated SELECT generate_series(1, 100)")

    def ask(_):
        with Client(service.url) as client:
            barrier.wait()
            return client.template(key, build=build, timeout=240)

    with ThreadPoolExecutor(max_workers=2) as pool:
        templates = list(pool.map(ask, range(2)))
    assert [t.status for t in templates] == ["ready", "ready"] and len(builds) == 1
    client = Client(service.url)
    assert [t.key for t in client.templates()] == [key]
    clone = client.create(template=key, ttl=600)
    assert len(rows(clone.connection_uri, "migrated")) == 100


def test_the_plugin_clones_a_template_of_the_migrations_folder(service, pytester, monkeypatch):
    migrations = pytester.mkdir("migrations")
    (migrations / "001_orders.sql").write_text("CREATE TABLE orders (id int PRIMARY KEY);")
    (migrations / "002_seed.sql").write_text("INSERT INTO orders SELECT generate_series(1, 10);")
    builds = pytester.path / "builds.txt"
    pytester.makeconftest(f"""
        import pytest
        from dbprov_client.pytest_plugin import run_sql_files

        @pytest.fixture(scope="session")
        def dbprov_template_build(dbprov_migrations):
            def build(uri):
                with open({str(builds)!r}, "a") as file:
                    file.write("built\\n")
                run_sql_files(dbprov_migrations, uri)  # the default's way
            return build
        """)
    pytester.makepyfile(test_suite="""
        import psycopg

        def count(database):
            with psycopg.connect(database.connection_uri, connect_timeout=5) as conn:
                return conn.execute("SELECT count(*) FROM orders").fetchone()[0]

        def test_one(dbprov_database):
            assert count(dbprov_database) == 10
            with psycopg.connect(dbprov_database.connection_uri, connect_timeout=5) as conn:
                conn.execute("DELETE FROM orders")

        def test_two(dbprov_database):
            assert count(dbprov_database) == 10  # a clone of its own
        """)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("DBPROV_URL", raising=False)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "dbprov_client.pytest_plugin", f"--dbprov-url={service.url}",
        "--dbprov-migrations", "migrations", timeout=300,
    )
    result.assert_outcomes(passed=2)
    assert builds.read_text() == "built\n"
    (template,) = Client(service.url).templates()
    assert template.key.startswith("sha256:") and template.status == "ready"


def test_dbprov_db_clones_the_migrated_database_per_test_inside_one_server(service, pytester, monkeypatch):
    migrations = pytester.mkdir("migrations")
    (migrations / "001_item.sql").write_text("CREATE TABLE item (id serial PRIMARY KEY, label text);")
    (migrations / "002_seed.sql").write_text("INSERT INTO item (label) VALUES ('a'), ('b');")
    handed = pytester.path / "handed.txt"
    pytester.makepyfile(test_suite=f"""
        import time

        import psycopg
        import pytest

        def labels(clone):
            with open({str(handed)!r}, "a") as file:
                file.write(f"{{clone.server.id}} {{clone.database}}\\n")
            with psycopg.connect(clone.connection_uri, connect_timeout=5) as conn:
                return [row[0] for row in conn.execute("SELECT label FROM item ORDER BY id")]

        def test_writes(dbprov_db):
            assert labels(dbprov_db) == ["a", "b"]
            with psycopg.connect(dbprov_db.connection_uri, connect_timeout=5) as conn:
                conn.execute("INSERT INTO item (label) VALUES ('mine')")
                # The tenant's own: it made the clone.
                assert conn.execute("SELECT pg_get_userbyid(datdba) = current_user FROM pg_database "
                                    "WHERE datname = current_database()").fetchone() == (True,)

        @pytest.mark.parametrize("n", range(4))
        def test_reads(dbprov_db, n):
            assert labels(dbprov_db) == ["a", "b"]  # the migrated schema, not the other test's row

        def test_the_written_one_is_dropped(dbprov_db):
            written = open({str(handed)!r}).readline().split()[1]
            deadline = time.monotonic() + 30
            with psycopg.connect(dbprov_db.connection_uri, autocommit=True, connect_timeout=5) as conn:
                while conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (written,)).fetchone():
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        """)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("DBPROV_URL", raising=False)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "dbprov_client.pytest_plugin", f"--dbprov-url={service.url}",
        "--dbprov-migrations", "migrations", "--dbprov-db-ahead", "1", timeout=300,
    )
    result.assert_outcomes(passed=6)
    lines = [line.split() for line in handed.read_text().splitlines()]
    (server_id,) = {server for server, _ in lines}  # one server for the session
    databases = [database for _, database in lines[:-1]]  # the last test's own is not counted
    assert databases[0] not in databases[1:]  # written to: dropped
    assert len(set(databases[1:])) < len(databases[1:])  # only read: handed out again
    listing = service.request("GET", "/databases", params={"page_size": 500}).json()["items"]
    assert [item["id"] for item in listing if (item["name"] or "").startswith("pytest-")] == [server_id]
    service.wait_for_status(server_id, "deleted")  # and every database in it with it


def test_a_dump_restored_into_a_new_database(service, shell, tmp_path):
    client = Client(service.url)
    source = client.create(ttl=600)
    with connect(source.connection_uri) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO item SELECT i, 'row ' || i FROM generate_series(1, 200) i")
    archive = tmp_path / "app.dump"
    written = client.dump(source.id, archive)
    assert written == archive.stat().st_size and archive.read_bytes().startswith(b"PGDMP")
    target = client.create(ttl=600)
    assert client.restore(target.id, archive).id == target.id
    assert rows(target.connection_uri) == list(range(1, 201))

    by_command = tmp_path / "command.dump"
    assert shell("dump", source.id, "-o", str(by_command)).returncode == 0
    other = client.create(ttl=600)
    restored = shell("restore", other.id, str(by_command))
    assert restored.returncode == 0 and restored.stdout == f"{other.id} restored\n", restored.stderr
    assert len(rows(other.connection_uri)) == 200
    again = shell("restore", other.id, str(by_command))
    assert again.returncode == 4 and again.stderr.startswith("Error: Conflict")
