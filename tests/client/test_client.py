"""The Python client: problems as exceptions, retries after Retry-After, creates
made safe to retry with an Idempotency-Key, the database context manager."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from dbprov_client import (
    Client, Credentials, Database, Locked, NotFound, ProblemError, Refused, Snapshot, Template, Unavailable,
    WaitTimeout, parse_duration,
)
from dbprov_client.client import retry_after
from dbprov_client.config import resolve, save


def test_create_waits_and_returns_the_uri(client, fake):
    database = client.create(version="17", ttl="30m", name="orders")
    assert isinstance(database, Database)
    assert database.status == "ready" and database.connection_uri.startswith("postgresql://app:")
    sent = fake.requests_to("POST", "/databases")[0]
    assert sent.body == {"version": "17", "ttl": 1800, "name": "orders"}
    assert "password" not in repr(database) and database.password not in repr(database)


@pytest.mark.parametrize(("status", "kind"), [
    (404, NotFound), (401, Refused), (403, Refused), (409, Refused), (422, Refused),
    (500, Unavailable), (502, Unavailable), (504, Unavailable),
])
def test_each_status_is_its_exception_with_the_problem(client, fake, status, kind):
    document = {"type": "urn:dbprov:problem:x", "title": "Some title", "status": status,
                "detail": "what went wrong", "database_id": "abc"}
    fake.fail("GET", "/databases/abc", status, document)
    with pytest.raises(kind) as raised:
        client.get("abc")
    problem = raised.value
    assert isinstance(problem, ProblemError)
    assert (problem.status, problem.type, problem.title, problem.detail) == (
        status, "urn:dbprov:problem:x", "Some title", "what went wrong")
    assert problem.body == document and problem.database_id == "abc"
    assert str(problem) == "Some title: what went wrong"


def test_a_body_that_is_no_problem_document_still_raises(client, fake):
    fake.fail("GET", "/quota", 414, {"not": "a problem"})
    with pytest.raises(Refused) as raised:
        client.quota()
    assert raised.value.status == 414 and raised.value.title


def test_an_unknown_database_is_not_found(client):
    with pytest.raises(NotFound):
        client.get("nosuch")
    with pytest.raises(NotFound):
        client.get("../quota")  # never a path of its own


def test_no_server_is_unavailable_after_bounded_retries(isolated):
    client = Client("http://127.0.0.1:1")
    waits = []
    client.sleep = waits.append
    with pytest.raises(Unavailable) as raised:
        client.list()
    assert raised.value.status is None and "Connection refused" in raised.value.detail
    assert waits == [0.5, 1.0]  # connect_retries=2, then it gives up


def test_a_refused_connection_is_not_retried_for_a_request_unsafe_to_repeat(isolated):
    client = Client("http://127.0.0.1:1")
    waits = []
    client.sleep = waits.append
    with pytest.raises(Unavailable):
        client.rotate("abc")
    assert waits == []


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_are_retried_after_retry_after(client, fake, status):
    fake.fail("GET", "/quota", status, headers={"Retry-After": "2"}, times=2)
    assert client.quota().tenant == "default"
    assert client.waits == [2.0, 2.0]
    assert len(fake.requests_to("GET", "/quota")) == 3


def test_retry_after_is_bounded_and_retries_are_too(client, fake):
    client.retries = 3
    fake.fail("GET", "/quota", 503, headers={"Retry-After": "3600"}, times=10)
    with pytest.raises(Unavailable) as raised:
        client.quota()
    assert raised.value.status == 503
    assert client.waits == [30.0, 30.0, 30.0]
    assert len(fake.requests_to("GET", "/quota")) == 4


def test_without_retry_after_the_backoff_grows(client, fake):
    fake.fail("GET", "/plans", 503, headers={}, times=3)
    client.plans()
    first, second, third = client.waits
    assert 0.5 <= first <= 1 and 1 <= second <= 2 and 2 <= third <= 4


def test_retry_after_as_an_http_date():
    later = datetime.now(timezone.utc) + timedelta(seconds=20)
    assert 15 < retry_after(format_datetime(later, usegmt=True)) <= 20
    assert retry_after("7") == 7.0
    assert retry_after(None) is None and retry_after("soon") is None


def test_a_retried_create_sends_the_same_key_and_body_and_makes_one_database(client, fake):
    fake.fail("POST", "/databases", 503, headers={"Retry-After": "1"})
    fake.fail("POST", "/databases", 429, headers={"Retry-After": "1"})
    database = client.create(version="17", ttl=600)
    posts = fake.requests_to("POST", "/databases")
    assert len(posts) == 3
    keys = {p.headers["Idempotency-Key"] for p in posts}
    assert len(keys) == 1 and keys.pop().startswith("dbprov-client-")
    assert all(p.body == {"version": "17", "ttl": 600} for p in posts)
    assert list(fake.databases) == [database.id]


def test_a_create_whose_answer_was_lost_is_answered_by_the_retry(client, fake):
    """A lost answer, as a 503 after the server recorded it, is retried with the
    same key, and the server answers with the database it made."""
    first = client.create(idempotency_key="ci-run-1", name="lost")
    again = client.create(idempotency_key="ci-run-1", name="lost")
    assert again.id == first.id and len(fake.databases) == 1


def test_each_create_has_its_own_key(client, fake):
    client.create()
    client.create()
    keys = [p.headers["Idempotency-Key"] for p in fake.requests_to("POST", "/databases")]
    assert len(set(keys)) == 2 and len(fake.databases) == 2


def test_a_long_wait_asks_again_with_the_same_key(client, fake):
    fake.provision_seconds = 1.5
    accepted = []
    database = client.create(on_accepted=accepted.append)
    assert accepted[0].status == "pending" and database.status == "ready"
    posts = fake.requests_to("POST", "/databases")
    assert posts[0].headers["Prefer"] == "respond-async"
    assert posts[1].headers["Prefer"].startswith("wait=")
    assert len({p.headers["Idempotency-Key"] for p in posts}) == 1 and len(fake.databases) == 1


def test_a_wait_that_runs_out_names_the_database(client, fake):
    fake.provision_seconds = 30
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as raised:
        client.create(timeout=1.5)
    assert time.monotonic() - started < 10
    assert raised.value.database_id in fake.databases


def test_no_wait_answers_at_once(client, fake):
    fake.provision_seconds = 30
    database = client.create(wait=False)
    assert database.status == "pending" and database.connection_uri


def test_the_context_manager_deletes_the_database(client, fake):
    with client.database(version="17", ttl=600) as db:
        assert db.connection_uri and fake.databases[db.id].status == "ready"
    assert fake.databases[db.id].status == "deleted"
    with pytest.raises(RuntimeError), client.database() as failing:
        raise RuntimeError("the test failed")
    assert fake.databases[failing.id].status == "deleted"


def test_a_method_per_endpoint(client, fake):
    database = client.create(ttl=60)
    assert client.get(database.id).status == "ready"
    assert [d.id for d in client.list().items] == [database.id]
    assert [d.id for d in client.list_all(status="ready")] == [database.id]
    credentials = client.credentials(database.id)
    assert isinstance(credentials, Credentials) and credentials.connection_uri == database.connection_uri
    assert client.rotate(database.id).password != database.password
    renewed = client.update(database.id, ttl="2h")
    assert renewed.expires_at > datetime.now(timezone.utc) + timedelta(minutes=119)
    assert fake.requests_to("PATCH", f"/databases/{database.id}")[-1].body == {"ttl": 7200}
    client.update(database.id, expires_at=None, protected=True)
    assert fake.requests_to("PATCH", f"/databases/{database.id}")[-1].body == {
        "expires_at": None, "protected": True}
    assert client.stop(database.id, wait=True).status == "stopped"
    assert client.start(database.id).status == "ready"
    assert client.events(database.id)[0].kind == "requested"
    assert client.logs(database.id, tail=2) == "log line 0\nlog line 1\n"
    assert fake.requests_to("GET", f"/databases/{database.id}/logs")[-1].query == {"tail": ["2"]}
    assert client.plans()[0].name == "default"
    assert client.quota().used == 1
    assert client.readyz().checks == {"metadata": "ok", "docker": "ok"}
    assert client.delete(database.id, wait=True).status == "deleted"


def test_readyz_is_not_retried(client, fake):
    fake.fail("GET", "/readyz", 503, headers={"Retry-After": "5"})
    with pytest.raises(Unavailable):
        client.readyz()
    assert client.waits == []


def test_the_token_is_sent(fake, isolated):
    fake.token = "dbp_secret"
    with pytest.raises(Refused) as raised:
        Client(fake.url).quota()
    assert raised.value.status == 401
    assert Client(fake.url, "dbp_secret").quota().tenant == "default"


def test_url_and_token_come_from_the_environment_then_the_login(isolated, monkeypatch):
    assert resolve() == ("http://127.0.0.1:8080", None)
    save("https://dbprov.example", "dbp_stored")
    assert resolve() == ("https://dbprov.example", "dbp_stored")
    # The stored token goes only to the stored server.
    monkeypatch.setenv("DBPROV_URL", "http://elsewhere:8080/")
    assert resolve() == ("http://elsewhere:8080", None)
    monkeypatch.setenv("DBPROV_TOKEN", "dbp_env")
    assert resolve() == ("http://elsewhere:8080", "dbp_env")
    assert resolve("http://given", "dbp_given") == ("http://given", "dbp_given")


@pytest.mark.parametrize(("text", "seconds"), [
    ("600", 600), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1h30m", 5400),
    (45, 45), (timedelta(minutes=2), 120),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "0", "-5m"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# -- data: snapshots, clones, resets, templates, dumps -----------------------------


def test_snapshot_clone_and_reset(client, fake):
    source = client.create()
    fake.databases[source.id].data = b"orders v1"
    snapshot = client.snapshot(source.id)
    assert isinstance(snapshot, Snapshot) and snapshot.status == "ready"
    assert snapshot.database_id == source.id and snapshot.size_bytes == len(b"orders v1")
    assert fake.requests_to("POST", f"/databases/{source.id}/snapshots")[0].headers["Prefer"].startswith("wait=")
    assert [s.id for s in client.snapshots()] == [snapshot.id]
    assert client.get_snapshot(snapshot.id) == snapshot

    clone = client.create(from_snapshot=snapshot.id, ttl=60)
    assert fake.requests_to("POST", "/databases")[-1].body == {"from_snapshot": snapshot.id, "ttl": 60}
    assert fake.databases[clone.id].data == b"orders v1"
    copy = client.create(from_database=source.id)
    assert fake.databases[copy.id].data == b"orders v1"

    fake.databases[clone.id].data = b"changed"
    reset = client.reset(clone.id)
    assert reset.status == "ready" and fake.databases[clone.id].data == b"orders v1"
    assert fake.requests_to("POST", f"/databases/{clone.id}/reset")[0].body is None
    client.reset(copy.id, snapshot=snapshot.id)
    assert fake.requests_to("POST", f"/databases/{copy.id}/reset")[0].body == {"snapshot": snapshot.id}
    with pytest.raises(Refused) as raised:
        client.reset(source.id)  # made from no snapshot
    assert raised.value.status == 409
    assert client.delete_snapshot(snapshot.id).status == "deleting"
    with pytest.raises(NotFound):
        client.get_snapshot("../quota")


def test_a_snapshot_without_wait_is_pending_and_can_be_waited_for(client, fake):
    source = client.create()
    snapshot = client.snapshot(source.id, wait=False)
    assert snapshot.status == "pending"
    assert client.wait_for_snapshot(snapshot.id, timeout=10).status == "ready"


def test_a_snapshot_is_retried_after_429(client, fake):
    source = client.create()
    fake.fail("POST", f"/databases/{source.id}/snapshots", 429, headers={"Retry-After": "3"})
    assert client.snapshot(source.id).status == "ready"
    assert client.waits == [3.0] and len(fake.snapshots) == 1


def test_the_first_template_caller_builds_and_finalizes(client, fake):
    built = []
    template = client.template("sha256:abc", "17", build=built.append, pool_size=2)
    assert isinstance(template, Template) and template.status == "ready" and template.pool_size == 2
    (uri,) = built
    assert uri.startswith("postgresql://app:")
    assert fake.requests_to("POST", "/templates")[0].body == {"key": "sha256:abc", "version": "17"}
    assert fake.requests_to("POST", "/templates/sha256:abc/finalize")[0].body == {"pool_size": 2}
    # Ready now: the next caller builds nothing.
    again = client.template("sha256:abc", build=built.append)
    assert again.status == "ready" and len(built) == 1
    assert [t.key for t in client.templates()] == ["sha256:abc"]
    clone = client.create(template="sha256:abc")
    assert fake.databases[clone.id].template == "sha256:abc"
    assert client.delete_template("sha256:abc").key == "sha256:abc"


def test_a_template_being_built_is_waited_for_after_retry_after(client, fake):
    fake.fail("POST", "/templates", 423, headers={"Retry-After": "4"}, times=2,
              body={"type": "urn:dbprov:problem:locked", "title": "Being built", "status": 423,
                    "detail": "being built by another client", "template": "sha256:abc"})
    built = []
    assert client.template("sha256:abc", build=built.append).status == "ready"
    assert client.waits == [4.0, 4.0] and len(built) == 1
    assert len(fake.requests_to("POST", "/templates")) == 3


def test_the_wait_for_a_template_is_bounded(client, fake):
    fake.fail("POST", "/templates", 423, headers={"Retry-After": "3600"}, times=1000)
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as raised:
        client.template("sha256:abc", build=lambda uri: None, timeout=0.5)
    assert time.monotonic() - started < 5
    assert "still being built" in raised.value.detail
    assert all(wait <= 30.0 for wait in client.waits)  # each wait at most max_retry_wait


def test_two_concurrent_callers_build_once(fake, isolated):
    built = []

    def build(uri):
        time.sleep(0.3)
        built.append(uri)

    def ask(_):
        with Client(fake.url) as client:
            return client.template("sha256:together", build=build, timeout=30)

    with ThreadPoolExecutor(max_workers=2) as pool:
        templates = list(pool.map(ask, range(2)))
    assert [t.status for t in templates] == ["ready", "ready"] and len(built) == 1
    codes = fake.requests_to("POST", "/templates")
    assert len(codes) >= 3  # one built it, the other asked again after its 423


def test_a_failed_build_frees_the_key_for_the_next_caller(client, fake):
    def broken(uri):
        raise RuntimeError("migration 002 failed")

    with pytest.raises(RuntimeError, match="migration 002"):
        client.template("sha256:abc", build=broken)
    assert fake.requests_to("DELETE", "/templates/sha256:abc") and not fake.templates
    assert client.template("sha256:abc", build=lambda uri: None).status == "ready"


def test_a_locked_template_is_a_refusal_of_its_own(client, fake):
    client.begin_template("sha256:abc")
    with pytest.raises(Locked) as raised:
        client.begin_template("sha256:abc")
    assert isinstance(raised.value, Refused) and raised.value.retry_after == "1"
    with pytest.raises(NotFound):
        client.get_template("no/such")


def test_dump_streams_into_a_file_and_restore_streams_it_back(client, fake, tmp_path):
    source = client.create()
    fake.databases[source.id].data = bytes(range(256)) * 8192  # 2 MiB
    sink = io.BytesIO()
    written = client.dump(source.id, sink)
    assert written == 5 + 2 * 1024 * 1024 and sink.getvalue().startswith(b"PGDMP")
    path = tmp_path / "app.dump"
    assert client.dump(source.id, path) == written and path.read_bytes() == sink.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == ["app.dump"]  # no partial file left

    target = client.create()
    restored = client.restore(target.id, path)
    assert restored.id == target.id
    assert fake.databases[target.id].data == fake.databases[source.id].data
    sent = fake.requests_to("POST", f"/databases/{target.id}/restore")[0]
    assert sent.headers["Content-Type"] == "application/octet-stream"
    assert sent.headers["Content-Length"] == str(written)
    with pytest.raises(Refused) as raised:
        client.restore(target.id, path)  # not empty now
    assert raised.value.status == 409


def test_a_failed_dump_leaves_no_file(client, fake, tmp_path):
    fake.fail("GET", "/databases/abc/dump", 409, {"type": "urn:dbprov:problem:conflict", "title": "Conflict",
                                                  "status": 409, "detail": "not ready"})
    with pytest.raises(Refused):
        client.dump("abc", tmp_path / "app.dump")
    assert list(tmp_path.iterdir()) == []


def test_a_restore_retried_after_503_sends_the_whole_file_again(client, fake):
    target = client.create()
    fake.fail("POST", f"/databases/{target.id}/restore", 503, headers={"Retry-After": "1"})
    archive = io.BytesIO(b"PGDMP" + b"x" * 100_000)
    client.restore(target.id, archive)
    first, second = fake.requests_to("POST", f"/databases/{target.id}/restore")
    assert second.raw == archive.getvalue() and fake.databases[target.id].data == b"x" * 100_000
