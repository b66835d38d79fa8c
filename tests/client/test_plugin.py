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
