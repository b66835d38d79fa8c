"""The pytest plugin, run by pytester in a child pytest against the stand-in API."""

from __future__ import annotations

import re

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture
def run(pytester, fake, isolated, monkeypatch):
    monkeypatch.setenv("DBPROV_URL", fake.url)

    def run(source: str, *args: str, autoload: bool = False):
        """A child pytest; without ``autoload`` it loads only the plugin (the
        others of this environment take seconds to import)."""
        pytester.makepyfile(test_suite=source)
        if not autoload:
            monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
            args = ("-p", "dbprov_client.pytest_plugin", *args)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)

    return run


def test_each_test_gets_a_fresh_database_deleted_after_it(run, fake):
    result = run(
        """
        ids = []

        def test_one(dbprov_database):
            assert dbprov_database.connection_uri.startswith("postgresql://")
            ids.append(dbprov_database.id)

        def test_two(dbprov_database):
            assert dbprov_database.id not in ids
        """,
        autoload=True,  # found through its pytest11 entry point
    )
    result.assert_outcomes(passed=2)
    assert len(fake.databases) == 2
    assert all(record.status == "deleted" for record in fake.databases.values())
    creates = fake.requests_to("POST", "/databases")
    assert all(c.body["ttl"] == 600 for c in creates)
    names = [c.body["name"] for c in creates]
    assert all(re.fullmatch(r"pytest-[0-9a-f]{6}-main-\d+", name) for name in names), names


def test_the_session_database_is_shared_and_deleted_at_the_end(run, fake):
    result = run(
        """
        seen = set()

        def test_one(dbprov_database_session):
            seen.add(dbprov_database_session.id)

        def test_two(dbprov_database_session):
            seen.add(dbprov_database_session.id)
            assert len(seen) == 1
        """
    )
    result.assert_outcomes(passed=2)
    assert len(fake.databases) == 1
    assert next(iter(fake.databases.values())).status == "deleted"


def test_the_lease_is_renewed_while_tests_run(run, fake):
    result = run(
        """
        import time

        def test_long(dbprov_database):
            time.sleep(2.6)
        """,
        "--dbprov-ttl", "3s",
    )
    result.assert_outcomes(passed=1)
    (database_id,) = fake.databases
    renewals = fake.requests_to("PATCH", f"/databases/{database_id}")
    assert len(renewals) >= 2 and all(r.body == {"ttl": 3} for r in renewals)
    assert fake.requests_to("POST", "/databases")[0].body["ttl"] == 3


def test_options_and_create_options(run, fake, monkeypatch):
    fake.token = "dbp_secret"
    monkeypatch.setenv("DBPROV_URL", "http://127.0.0.1:1")  # the option wins
    result = run(
        """
        import pytest

        @pytest.fixture(scope="session")
        def dbprov_create_options():
            return {"version": "16", "extensions": ["citext"]}

        def test_it(dbprov_database):
            pass
        """,
        f"--dbprov-url={fake.url}", "--dbprov-token=dbp_secret",
    )
    result.assert_outcomes(passed=1)
    create = fake.requests_to("POST", "/databases")[0]
    assert create.body["version"] == "16" and create.body["extensions"] == ["citext"]
    assert create.headers["Authorization"] == "Bearer dbp_secret"


def test_a_refusal_fails_the_test_with_the_problem(run, fake):
    fake.fail("POST", "/databases", 403, {"type": "urn:dbprov:problem:forbidden", "title": "Forbidden",
                                          "status": 403, "detail": "plan not allowed"})
    result = run("def test_it(dbprov_database):\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Refused: Forbidden: plan not allowed*"])


def test_each_xdist_worker_has_its_own_databases(run, fake):
    result = run(
        """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_it(dbprov_database, dbprov_database_session, n):
            pass
        """,
        "-p", "xdist", "-n", "2",
    )
    result.assert_outcomes(passed=4)
    names = [c.body["name"] for c in fake.requests_to("POST", "/databases")]
    workers = {re.fullmatch(r"pytest-([0-9a-f]{6})-(gw\d)-\d+", name).groups() for name in names}
    assert {worker for _, worker in workers} == {"gw0", "gw1"}
    assert len({run_id for run_id, _ in workers}) == 1  # one run, two workers
    assert len(names) == len(set(names)) == 6  # 4 per test, one per worker's session
    assert all(record.status == "deleted" for record in fake.databases.values())


MIGRATED_SUITE = """
    import pytest

    @pytest.fixture(scope="session")
    def dbprov_template_build():
        def build(uri):
            with open({builds!r}, "a") as file:
                file.write(uri + "\\n")
        return build

    def test_one(dbprov_database):
        assert dbprov_database.connection_uri

    def test_two(dbprov_database):
        assert dbprov_database.connection_uri
    """


def test_a_migrations_folder_names_the_template_each_test_clones(run, fake, pytester):
    from dbprov_client.pytest_plugin import template_key

    migrations = pytester.mkdir("migrations")
    (migrations / "001_orders.sql").write_text("CREATE TABLE orders (id int);")
    builds = pytester.path / "builds.txt"
    result = run(MIGRATED_SUITE.format(builds=str(builds)), "--dbprov-migrations", "migrations",
                 "--dbprov-template-pool", "2")
    result.assert_outcomes(passed=2)
    key = template_key(migrations)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", key)
    assert len(builds.read_text().splitlines()) == 1
    assert fake.templates[key].status == "ready" and fake.templates[key].pool_size == 2
    creates = fake.requests_to("POST", "/databases")
    assert len(creates) == 2 and all(c.body["template"] == key for c in creates)

    # A second run with the same migrations clones at once; a changed file is a new template.
    run(MIGRATED_SUITE.format(builds=str(builds)), "--dbprov-migrations", "migrations").assert_outcomes(passed=2)
    assert len(builds.read_text().splitlines()) == 1
    (migrations / "002_items.sql").write_text("CREATE TABLE items (id int);")
    pytester.makeini("[pytest]\ndbprov_migrations = migrations\n")
    run(MIGRATED_SUITE.format(builds=str(builds))).assert_outcomes(passed=2)
    assert len(builds.read_text().splitlines()) == 2
    assert template_key(migrations) in fake.templates and len(fake.templates) == 2


def test_under_xdist_the_template_is_built_once(run, fake, pytester):
    migrations = pytester.mkdir("migrations")
    (migrations / "001.sql").write_text("CREATE TABLE t (id int);")
    builds = pytester.path / "builds.txt"
    suite = MIGRATED_SUITE.replace("def build(uri):", "def build(uri):\n            import time; time.sleep(0.5)")
    result = run(suite.format(builds=str(builds)) + """
    @pytest.mark.parametrize("n", range(4))
    def test_more(dbprov_database, n):
        pass
    """, "--dbprov-migrations", "migrations", "-p", "xdist", "-n", "2")
    result.assert_outcomes(passed=6)
    assert len(builds.read_text().splitlines()) == 1
    assert len(fake.requests_to("POST", "/templates")) >= 3  # the other worker asked again after 423
    assert all(c.body["template"] for c in fake.requests_to("POST", "/databases"))


def test_the_key_hashes_names_and_contents_in_order(tmp_path):
    from dbprov_client.pytest_plugin import template_key

    (tmp_path / "a.sql").write_text("one")
    (tmp_path / "b.sql").write_text("two")
    (tmp_path / ".hidden").write_text("ignored")
    first = template_key(tmp_path)
    assert template_key(tmp_path) == first
    (tmp_path / ".hidden").write_text("still ignored")
    assert template_key(tmp_path) == first
    assert template_key(tmp_path, "16") != first
    (tmp_path / "b.sql").rename(tmp_path / "c.sql")
    assert template_key(tmp_path) != first
    (tmp_path / "c.sql").rename(tmp_path / "b.sql")
    (tmp_path / "b.sql").write_text("two!")
    assert template_key(tmp_path) != first


def test_a_missing_migrations_folder_is_a_usage_error(run):
    result = run("def test_it(dbprov_database):\n    pass\n", "--dbprov-migrations", "nowhere")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*nowhere is not a folder*"])


def test_the_default_build_runs_the_sql_files_in_name_order(tmp_path, monkeypatch):
    from dbprov_client import pytest_plugin

    (tmp_path / "002_b.sql").write_text("two")
    (tmp_path / "001_a.sql").write_text("one")
    (tmp_path / "notes.txt").write_text("not run")
    ran = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def transaction(self):
            return self

        def execute(self, sql):
            ran.append(sql)

    import psycopg

    monkeypatch.setattr(psycopg, "connect", lambda uri, **kwargs: Connection())
    pytest_plugin.run_sql_files(tmp_path, "postgresql://x")
    assert ran == ["one", "two"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="no \\*.sql file"):
        pytest_plugin.run_sql_files(empty, "postgresql://x")
    monkeypatch.setitem(__import__("sys").modules, "psycopg", None)
    with pytest.raises(RuntimeError, match="psycopg, which is not installed"):
        pytest_plugin.run_sql_files(tmp_path, "postgresql://x")


DB_SUITE = """
    import time

    import psycopg
    import pytest

    def handed(clone):
        with open({names!r}, "a") as file:
            file.write(clone.database + "\\n")

    def labels(clone):
        with psycopg.connect(clone.connection_uri) as conn:
            return [row[0] for row in conn.execute("SELECT label FROM item ORDER BY id")]

    def test_writes(dbprov_db):
        handed(dbprov_db)
        assert labels(dbprov_db) == ["a", "b"]
        with psycopg.connect(dbprov_db.connection_uri) as conn:
            conn.execute("INSERT INTO item (label) VALUES ('mine')")
        assert labels(dbprov_db) == ["a", "b", "mine"]

    @pytest.mark.parametrize("n", range(5))
    def test_reads(dbprov_db, n):
        handed(dbprov_db)
        assert labels(dbprov_db) == ["a", "b"]  # not the other test's row

    def test_the_written_one_is_dropped(dbprov_db):
        written = open({names!r}).readline().strip()
        deadline = time.monotonic() + 30
        with psycopg.connect(dbprov_db.connection_uri, autocommit=True) as conn:
            while conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (written,)).fetchone():
                assert time.monotonic() < deadline
                time.sleep(0.05)
    """


def test_dbprov_db_hands_each_test_a_clone_of_the_migrated_database_in_one_server(run, backed, pytester):
    from dbprov_client.pytest_plugin import template_key

    migrations = pytester.mkdir("migrations")
    (migrations / "001_item.sql").write_text("CREATE TABLE item (id serial PRIMARY KEY, label text);")
    (migrations / "002_seed.sql").write_text("INSERT INTO item (label) VALUES ('a'), ('b');")
    names = pytester.path / "names.txt"
    result = run(DB_SUITE.format(names=str(names)), "--dbprov-migrations", "migrations", "--dbprov-db-ahead", "1")
    result.assert_outcomes(passed=7)

    handed = names.read_text().split()
    written, reads = handed[0], handed[1:]
    assert re.fullmatch(r"pytest_[0-9a-f]{6}_main_\d+", written)
    assert written not in reads  # written to: dropped, never handed out again
    assert len(set(reads)) < len(reads)  # read only: handed out again
    (create,) = backed.requests_to("POST", "/databases")  # one server for the session
    assert create.body["template"] == template_key(migrations)
    # Its data is the session's: a server that does not sync makes and drops clones faster.
    assert create.body["durable"] is False
    assert [record.status for record in backed.databases.values() if record.name] == ["deleted"]


def test_under_xdist_each_worker_has_a_server_for_dbprov_db(run, backed, pytester):
    pytester.makeini("[pytest]\ndbprov_db_ahead = 2\ndbprov_db_backlog = 1\n")
    result = run(
        """
        import psycopg
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_it(dbprov_db, n):
            with psycopg.connect(dbprov_db.connection_uri) as conn:
                assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
                conn.execute("CREATE TABLE t (id int)")
        """,
        "-p", "xdist", "-n", "2",
    )
    result.assert_outcomes(passed=6)
    names = [c.body["name"] for c in backed.requests_to("POST", "/databases")]
    assert sorted(re.fullmatch(r"pytest-[0-9a-f]{6}-(gw\d)-1", name)[1] for name in names) == ["gw0", "gw1"]
    assert all(record.status == "deleted" for record in backed.databases.values())
