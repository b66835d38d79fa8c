"""Clones of a template database inside one server, against the PostgreSQL
test server, as a tenant role with CREATEDB (not a superuser) as dbprov's."""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest

from dbprov_client import Clone, Clones
from dbprov_client.clones import copy_strategy

from .fake import Record


def wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def template(backed):
    """A tenant's database with a table, rows and a sequence: the template."""
    record = Record("t" + uuid.uuid4().hex[:11], None, "17", 0, "", 0.0)
    backed.materialize(record)
    with psycopg.connect(record.real_uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE item (id serial PRIMARY KEY, label text)")
        conn.execute("INSERT INTO item (label) VALUES ('a'), ('b'), ('c')")
    return record.real_uri


@pytest.fixture
def clones(template):
    made = []

    def make(**options) -> Clones:
        options.setdefault("prefix", f"t{uuid.uuid4().hex[:8]}")
        made.append(Clones(template, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def names(uri: str) -> set[str]:
    with psycopg.connect(uri) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def labels(clone: Clone) -> list[str]:
    with psycopg.connect(clone.connection_uri) as conn:
        return [row[0] for row in conn.execute("SELECT label FROM item ORDER BY id")]


def test_each_clone_is_a_copy_of_the_template_made_before_it_is_asked_for(clones, template):
    pool = clones(ahead=3)
    wait_for(lambda: pool.made == 3, "three clones made ahead")
    first = pool.take()
    # One made before it was asked for, taken from the queue.
    assert first.database in {f"{pool.prefix}_{n}" for n in (1, 2, 3)}
    second = pool.take()
    assert labels(first) == labels(second) == ["a", "b", "c"]
    assert first.connection_uri.rsplit("/", 1) == [template.rsplit("/", 1)[0], first.database]
    assert (first.host, first.port) == ("127.0.0.1", urlsplit(template).port)
    assert first.username and first.password and "password" not in repr(first)
    with psycopg.connect(first.connection_uri) as conn:
        # Thrown away after the test: its commits do not wait for the disk.
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        conn.execute("INSERT INTO item (label) VALUES ('first only')")
    assert labels(second) == ["a", "b", "c"]
    wait_for(lambda: pool.made == 5, "the queue refilled")


def test_clones_are_copied_as_suits_a_server_that_syncs_or_does_not(clones):
    # The test server syncs: the copy is written to the WAL, with no checkpoint.
    assert clones(ahead=0)._strategy == " STRATEGY WAL_LOG"
    # dbprov_db's (not durable) does not: a copy of the files, whose checkpoints cost no sync.
    assert copy_strategy(170000, syncs=False) == " STRATEGY FILE_COPY"
    # Before 15 there was no choice, nor the clause.
    assert copy_strategy(140000, syncs=True) == copy_strategy(140000, syncs=False) == ""


@pytest.mark.parametrize("strategy", [" STRATEGY WAL_LOG", " STRATEGY FILE_COPY"])
def test_a_clone_is_handed_out_with_its_catalog_cache_made_by_a_session_only_if_need_be(
    clones, backed, monkeypatch, strategy
):
    monkeypatch.setattr("dbprov_client.clones.copy_strategy", lambda version, syncs: strategy)
    pool = clones(ahead=1)
    wait_for(lambda: pool.made == 1, "a clone made")
    clone = pool.take()
    with psycopg.connect(backed.postgres, autocommit=True) as admin:
        oid, sessions = admin.execute(
            "SELECT d.oid, s.sessions FROM pg_database d JOIN pg_stat_database s ON s.datid = d.oid "
            "WHERE d.datname = %s", (clone.database,)).fetchone()
        # The test's first session reads the catalogs' cache from the file, not from the catalogs.
        assert admin.execute("SELECT size > 0 FROM pg_stat_file(%s)", (f"base/{oid}/pg_internal.init",)).fetchone()
    # A copy of the pages needs a session of its own to build it; a copy of the files does not.
    assert sessions == (1 if "WAL_LOG" in strategy else 0)


READS = {
    "a query": "SELECT count(*) FROM item",
    "the catalogs": "SELECT count(*) FROM pg_class, pg_stat_user_tables",
    "a transaction rolled back that wrote nothing": "BEGIN; SELECT 1 FROM item FOR SHARE; ROLLBACK",
}
WRITES = {
    "an insert": "INSERT INTO item (label) VALUES ('x')",
    "an update": "UPDATE item SET label = 'z' WHERE id = 1",
    "a delete": "DELETE FROM item",
    "an insert rolled back": "BEGIN; INSERT INTO item (id, label) VALUES (100, 'x'); ROLLBACK",
    "a table": "CREATE TABLE other (id int)",
    "a temporary table": "CREATE TEMP TABLE scratch (id int)",
    "a truncate": "TRUNCATE item",
    "nextval": "SELECT nextval('item_id_seq')",
    "setval": "SELECT setval('item_id_seq', 1, false)",
    "a database setting": "ALTER DATABASE {database} SET work_mem = '8MB'",
    "a role's setting in it": "ALTER ROLE CURRENT_USER IN DATABASE {database} SET work_mem = '8MB'",
    "a comment on it": "COMMENT ON DATABASE {database} IS 'changed'",
    "its connection limit": "ALTER DATABASE {database} CONNECTION LIMIT 50",
}


def test_a_database_given_back_clean_is_handed_out_again_and_one_written_to_is_dropped(clones, template):
    pool = clones(ahead=2)
    outcomes = {}
    for what, statement in {**READS, **WRITES}.items():
        clone = pool.take()
        with psycopg.connect(clone.connection_uri, autocommit=True) as conn:
            conn.execute(statement.format(database=f'"{clone.database}"'))
        before = (pool.recycled, pool.dropped)
        pool.give_back(clone)
        wait_for(lambda: (pool.recycled, pool.dropped) != before, f"{what} checked")
        outcomes[what] = "recycled" if pool.recycled > before[0] else "dropped"
        assert (clone.database in names(template)) == (outcomes[what] == "recycled"), what
    assert outcomes == {**{what: "recycled" for what in READS}, **{what: "dropped" for what in WRITES}}
    # A clean one is handed out first again: no copy is made for it.
    assert pool.made <= len(WRITES) + 3


def test_sessions_left_open_are_ended_and_their_work_counted(clones, template):
    pool = clones(ahead=1)
    idle = pool.take()
    left_open = psycopg.connect(idle.connection_uri, autocommit=True)
    left_open.execute("SELECT count(*) FROM item")
    pool.give_back(idle)
    wait_for(lambda: pool.recycled == 1, "the idle one handed out again")
    with pytest.raises(psycopg.OperationalError):
        left_open.execute("SELECT 1")
    left_open.close()

    writing = pool.take()
    assert writing.database == idle.database
    in_transaction = psycopg.connect(writing.connection_uri)
    in_transaction.execute("INSERT INTO item (label) VALUES ('never committed')")
    pool.give_back(writing)
    wait_for(lambda: pool.dropped == 1, "the written one dropped")
    assert writing.database not in names(template)
    in_transaction.close()


def test_a_take_waits_for_the_thread_and_hears_of_its_failure(clones, backed):
    pool = clones(ahead=1)
    wait_for(lambda: pool.made == 1, "one clone made")
    with psycopg.connect(backed.postgres, autocommit=True) as admin:
        admin.execute(f'ALTER ROLE "{backed._role}" NOCREATEDB')
        try:
            pool.take()  # the one made; the next cannot be
            with pytest.raises(RuntimeError, match="could not make test databases: permission denied"):
                pool.take()
        finally:
            admin.execute(f'ALTER ROLE "{backed._role}" CREATEDB')


def test_closing_wakes_a_take_that_waits(clones):
    pool = clones(ahead=1)
    pool.take()
    wait_for(lambda: pool.made == 2, "the queue refilled")
    pool.ahead = 0  # the thread makes no more
    pool.take()
    failures = []

    def take():
        try:
            pool.take()
        except RuntimeError as exc:
            failures.append(str(exc))

    waiting = threading.Thread(target=take)
    waiting.start()
    pool.close()
    waiting.join(timeout=10)
    assert failures == ["dbprov: the test databases are closed"]
