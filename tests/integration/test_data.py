"""Data on the real engine: snapshots taken under writes, clones that live apart,
resets, templates built once under concurrent first requests, and dumps
restored elsewhere, all with real connections."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from .conftest import metric, needs_pool, wait_until

pytestmark = pytest.mark.docker


def create(service, **body) -> dict:
    response = service.request("POST", "/databases", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def snapshot_of(service, database_id: str) -> dict:
    response = service.request("POST", f"/databases/{database_id}/snapshots")
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "ready"
    return response.json()


def rows(uri: str, table: str = "item") -> list:
    with psycopg.connect(uri, connect_timeout=10) as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


class Writer(threading.Thread):
    """Inserts 1, 2, 3 ... one row a transaction, through outages, until stopped."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.committed = 0
        # Connections lost or refused: each outage of the source.
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.uri, connect_timeout=2, autocommit=True) as conn:
                    while not self.stopping.is_set():
                        conn.execute("INSERT INTO item VALUES (%s)", (self.committed + 1,))
                        self.committed += 1
            except psycopg.Error:
                self.failures += 1
                time.sleep(0.05)  # the snapshot's short stop: come back


class Poller(threading.Thread):
    """A new connection and a SELECT 1 every 50 ms, counting those refused."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.answered = self.refused = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            try:
                with psycopg.connect(self.uri, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                self.answered += 1
            except psycopg.Error:
                self.refused += 1


CHECKSUM = "SELECT md5(string_agg(id::text || ':' || label, ',' ORDER BY id)) FROM fixed"


@pytest.mark.parametrize(
    "service",
    [pytest.param({"DBPROV_STORAGE": "copy"}, id="copy"),
     pytest.param({"DBPROV_STORAGE": "btrfs"}, id="btrfs", marks=needs_pool)],
    indirect=True,
)
def test_a_snapshot_under_writes_restores_a_committed_state(service):
    assert service.request("GET", "/readyz").json()["storage"]["backend"] == service.env["DBPROV_STORAGE"]
    live = service.env["DBPROV_STORAGE"] == "btrfs"
    source = create(service)
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE fixed AS SELECT g AS id, md5(g::text) AS label FROM generate_series(1, 100000) g")
        checksum = conn.execute(CHECKSUM).fetchone()[0]
    writer, poller = Writer(source["connection_uri"]), Poller(source["connection_uri"])
    writer.start()
    wait_until(lambda: writer.committed > 50, timeout=30, what="writes before the snapshot")
    poller.start()
    wait_until(lambda: poller.answered > 2, timeout=30, what="the poller's first answers")
    before = writer.committed
    started = time.monotonic()
    snapshot = snapshot_of(service, source["id"])
    took = time.monotonic() - started
    after = writer.committed
    wait_until(lambda: writer.committed > after + 10, timeout=30, what="writes after the snapshot")
    for thread in (writer, poller):
        thread.stopping.set()
        thread.join(10)
    assert snapshot["size_bytes"] > 1_000_000 and took < 30
    if live:
        # Taken of the running server: not one connection lost or refused.
        assert (writer.failures, poller.refused) == (0, 0)

    clone = create(service, from_snapshot=snapshot["id"])
    copied = rows(clone["connection_uri"])
    # Every committed row up to some moment, and none after it: a committed state.
    assert copied == list(range(1, len(copied) + 1))
    assert before <= len(copied) <= writer.committed
    with psycopg.connect(clone["connection_uri"]) as conn:
        assert conn.execute(CHECKSUM).fetchone()[0] == checksum
    log = service.request("GET", f"/databases/{clone['id']}/logs?tail=200").text
    if live:
        # A copy of one instant, recovered like a crash.
        assert "automatic recovery in progress" in log
    else:
        # A copy of a clean stop.
        assert "database system was shut down" in log
        assert "automatic recovery in progress" not in log


def test_clones_live_apart_with_their_own_password(service):
    source = create(service)
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
        conn.execute("INSERT INTO item VALUES (1)")
    clone = create(service, from_database=source["id"])
    assert clone["source_snapshot_id"]
    assert rows(clone["connection_uri"]) == [1]
    assert clone["port"] != source["port"] and clone["password"] != source["password"]
    # The source's password does not open the clone.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(clone["connection_uri"].replace(clone["password"], source["password"]), connect_timeout=5)
    with psycopg.connect(clone["connection_uri"]) as conn:
        conn.execute("INSERT INTO item VALUES (2)")
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("INSERT INTO item VALUES (3)")
    assert rows(source["connection_uri"]) == [1, 3]
    assert rows(clone["connection_uri"]) == [1, 2]


def test_reset_goes_back_to_the_snapshot_with_the_same_uri(service):
    source = create(service)
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
        conn.execute("INSERT INTO item VALUES (1)")
    snapshot = snapshot_of(service, source["id"])
    clone = create(service, from_snapshot=snapshot["id"])
    held = psycopg.connect(clone["connection_uri"], autocommit=True)
    held.execute("INSERT INTO item VALUES (2)")
    reset = service.request("POST", f"/databases/{clone['id']}/reset")
    assert reset.status_code == 200 and reset.json()["status"] == "ready", reset.text
    # Connections were dropped; the same URI works at once, on the snapshot's data.
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    assert rows(clone["connection_uri"]) == [1]
    # The source goes back to its own snapshot too.
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("DELETE FROM item")
    assert service.request("POST", f"/databases/{source['id']}/reset", json={"snapshot": snapshot["id"]}).status_code == 200
    assert rows(source["connection_uri"]) == [1]


def test_a_template_is_built_once_and_every_clone_has_its_data(service):
    def ask(_):
        return service.request("POST", "/templates", json={"key": "sha256:migrations-v1"})

    barrier = threading.Barrier(4)

    def together(i):
        barrier.wait()
        return ask(i)

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(together, range(4)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 423, 423, 423], [a.text for a in answers]
    builder = next(a.json() for a in answers if a.status_code == 201)
    with psycopg.connect(builder["database"]["connection_uri"]) as conn:
        conn.execute("CREATE TABLE migrated (id int PRIMARY KEY)")
        conn.execute("INSERT INTO migrated SELECT generate_series(1, 1000)")
    finalized = service.request("POST", "/templates/sha256:migrations-v1/finalize", json={"pool_size": 1})
    assert finalized.status_code == 200 and finalized.json()["status"] == "ready", finalized.text
    assert ask(0).status_code == 200
    wait_until(
        lambda: metric(service, "dbprov_pool_servers", status="ready", version="17") == 1,
        timeout=60, what="the template's warm clone",
    )
    # The first from the pool, the second made while the pool refills.
    clones = [create(service, template="sha256:migrations-v1") for _ in range(2)]
    assert "claim" in clones[0]["phase_timings"] and "copy" in clones[1]["phase_timings"]
    for clone in clones:
        assert len(rows(clone["connection_uri"], "migrated")) == 1000
    with psycopg.connect(clones[0]["connection_uri"]) as conn:
        conn.execute("DELETE FROM migrated")
    assert len(rows(clones[1]["connection_uri"], "migrated")) == 1000
    assert service.request("DELETE", "/templates/sha256:migrations-v1").status_code == 202


def test_a_dump_restores_elsewhere_and_a_bad_archive_changes_nothing(service):
    source = create(service)
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO item SELECT i, 'row ' || i FROM generate_series(1, 500) i")
    dump = service.request("GET", f"/databases/{source['id']}/dump", stream=True)
    assert dump.status_code == 200 and dump.headers["Content-Type"] == "application/octet-stream"
    archive = b"".join(dump.iter_content(65536))
    assert archive.startswith(b"PGDMP")

    target = create(service)
    bad = service.request("POST", f"/databases/{target['id']}/restore", data=b"PGDMP but not really",
                          headers={"Content-Type": "application/octet-stream"})
    assert bad.status_code == 422 and "pg_restore" in bad.json()["detail"], bad.text
    with psycopg.connect(target["connection_uri"]) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
    good = service.request("POST", f"/databases/{target['id']}/restore", data=archive,
                           headers={"Content-Type": "application/octet-stream"})
    assert good.status_code == 200, good.text
    with psycopg.connect(target["connection_uri"]) as conn:
        assert conn.execute("SELECT count(*), max(label) FROM item").fetchone() == (500, "row 99")
        # Owned by the tenant's role, which can change it.
        conn.execute("DELETE FROM item WHERE id = 1")
    again = service.request("POST", f"/databases/{target['id']}/restore", data=archive,
                            headers={"Content-Type": "application/octet-stream"})
    assert again.status_code == 409
