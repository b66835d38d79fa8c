"""A database's life between create and delete, on the real engine with real
PostgreSQL servers: expiry and renewal, protection, stop and start, idempotent
creates, events, logs, plans, and per-database settings and extensions."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import docker.errors
import psycopg
import pytest

from .conftest import connected, events, kinds, managed, wait_until

pytestmark = pytest.mark.docker

# The test service reconciles every 0.5 s (conftest).
RECONCILE_INTERVAL = 0.5


def create(service, headers: dict[str, str] | None = None, **body) -> dict:
    response = service.request("POST", "/databases", json=body, headers=headers or {})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "ready"
    return created


def create_async(service, **body) -> dict:
    response = service.request("POST", "/databases", json=body, headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    return response.json()


def record(service, database_id: str) -> dict:
    response = service.request("GET", f"/databases/{database_id}")
    assert response.status_code == 200, response.text
    return response.json()


def connection_uri(service, database_id: str) -> str:
    response = service.request("GET", f"/databases/{database_id}/credentials")
    assert response.status_code == 200, response.text
    return response.json()["connection_uri"]


def total(service) -> int:
    return service.request("GET", "/databases").json()["total"]


def moment(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    # The API writes UTC; a bare time would still be UTC.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def seconds_until(text: str) -> float:
    return (moment(text) - datetime.now(timezone.utc)).total_seconds()


def managed_ids(docker_client) -> set[str]:
    return {c.labels["io.dbprov.database-id"] for c in managed(docker_client)}


def container_of(docker_client, database_id: str):
    return docker_client.containers.get(f"dbprov-{database_id}")


def assert_server_gone(docker_client, database_id: str) -> None:
    with pytest.raises(docker.errors.NotFound):
        container_of(docker_client, database_id)
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(f"dbprov-{database_id}-data")


def assert_conflict(response, *phrases: str) -> dict:
    assert response.status_code == 409, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:dbprov:problem:conflict"
    for phrase in phrases:
        assert phrase in problem["detail"], problem
    return problem


def refuses_connections(uri: str) -> bool:
    try:
        psycopg.connect(uri, connect_timeout=2).close()
    except psycopg.OperationalError:
        return True
    return False


# -- expiry -------------------------------------------------------------------


def test_expired_database_is_deleted_within_its_window_and_a_renewal_postpones_it(service, docker_client):
    # Asynchronous creates: the three seconds count from the request, and
    # waiting for readiness would eat into them.
    doomed = create_async(service, ttl=3)
    renewed = create_async(service, ttl=3)
    for created in (doomed, renewed):
        assert created["expires_at"] is not None
        assert 1 < seconds_until(created["expires_at"]) <= 3.5, created

    patched = service.request("PATCH", f"/databases/{renewed['id']}", json={"ttl": 600})
    assert patched.status_code == 200, patched.text
    assert seconds_until(patched.json()["expires_at"]) > 590

    # A server exists before the time is up, so the expiry has one to remove.
    # Whether it is ready by then depends on the machine: an expiry also
    # ends a provisioning.
    wait_until(lambda: managed_ids(docker_client) >= {doomed["id"]},
               timeout=max(0.1, seconds_until(doomed["expires_at"])), what="the server to be made")

    gone = service.wait_for_status(doomed["id"], "deleted", timeout=seconds_until(doomed["expires_at"]) + 15)
    expires_at = moment(doomed["expires_at"])
    # Not before its time, and within a few reconcile intervals after it.
    lateness = (moment(gone["deleted_at"]) - expires_at).total_seconds()
    assert 0 <= lateness < 5, gone
    assert gone["port"] is None
    assert_server_gone(docker_client, doomed["id"])

    history = events(service, doomed["id"])
    assert [e["kind"] for e in history][-2:] == ["expired", "deleted"], history
    expired = history[-2]
    assert expired["actor"] == "service"
    assert moment(expired["at"]) >= expires_at

    # The renewed one outlives its old expiry by several reconcile passes.
    wait_until(lambda: seconds_until(renewed["expires_at"]) < -4 * RECONCILE_INTERVAL, timeout=10,
               what="the old expiry to pass")
    assert record(service, renewed["id"])["status"] not in ("deleting", "deleted")
    service.wait_for_status(renewed["id"], "ready", timeout=30)
    assert "expired" not in kinds(service, renewed["id"])
    with psycopg.connect(connection_uri(service, renewed["id"])) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- protection ---------------------------------------------------------------


def test_protected_database_refuses_delete_and_expiry_until_unprotected(service, docker_client):
    guarded = create_async(service, protected=True)
    # Protected beyond its expiry: the shortest the API accepts.
    lapsed = create_async(service, protected=True, ttl=1)
    try:
        service.wait_for_status(guarded["id"], "ready")
        service.wait_for_status(lapsed["id"], "ready")
        refused = service.request("DELETE", f"/databases/{guarded['id']}")
        # The detail says how to lift the protection.
        assert_conflict(refused, "protected", "PATCH", f"/databases/{guarded['id']}", '"protected": false')
        assert record(service, guarded["id"])["status"] == "ready"
        assert container_of(docker_client, guarded["id"]).attrs["State"]["Running"] is True

        # Several reconcile passes after its expiry, the protected one is untouched.
        wait_until(lambda: seconds_until(lapsed["expires_at"]) < -4 * RECONCILE_INTERVAL, timeout=10,
                   what="the expiry to pass")
        assert record(service, lapsed["id"])["status"] == "ready"
        assert "expired" not in kinds(service, lapsed["id"])
        with psycopg.connect(connection_uri(service, lapsed["id"])) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        lifted = service.request("PATCH", f"/databases/{guarded['id']}", json={"protected": False})
        assert lifted.status_code == 200, lifted.text
        assert lifted.json()["protected"] is False
        deleted = service.request("DELETE", f"/databases/{guarded['id']}")
        assert deleted.status_code == 202, deleted.text
        service.wait_for_status(guarded["id"], "deleted")
        assert_server_gone(docker_client, guarded["id"])

        # Unprotected after its expiry, it expires at the next pass.
        lifted = service.request("PATCH", f"/databases/{lapsed['id']}", json={"protected": False})
        assert lifted.status_code == 200, lifted.text
        service.wait_for_status(lapsed["id"], "deleted", timeout=10)
        assert kinds(service, lapsed["id"])[-2:] == ["expired", "deleted"]
        assert_server_gone(docker_client, lapsed["id"])
    finally:
        # The fixture's teardown deletes everything; protection would make it wait forever.
        for database_id in (guarded["id"], lapsed["id"]):
            service.request("PATCH", f"/databases/{database_id}", json={"protected": False})


# -- stop and start -----------------------------------------------------------


def test_a_stopped_database_pruned_behind_the_services_back_is_lost_not_empty(service, docker_client):
    created = service.request("POST", "/databases", json={}).json()
    with psycopg.connect(created["connection_uri"]) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 7 AS n")
    service.request("POST", f"/databases/{created['id']}/stop")
    service.wait_for_status(created["id"], "stopped")
    # What `docker system prune --volumes` does to a stopped container and its volumes.
    docker_client.containers.get(f"dbprov-{created['id']}").remove()
    for volume in docker_client.volumes.list(filters={"name": f"dbprov-{created['id']}-"}):
        volume.remove()
    started = service.request("POST", f"/databases/{created['id']}/start")
    assert started.status_code == 410 and started.json()["type"] == "urn:dbprov:problem:data-lost", started.text
    lost = service.request("GET", f"/databases/{created['id']}").json()
    assert "is gone" in lost["last_error"] and lost["port"] is None
    assert not docker_client.containers.list(all=True, filters={"name": f"dbprov-{created['id']}"})


def test_stopped_database_frees_its_server_and_starts_again_with_its_data(service, docker_client):
    created = create(service)
    uri = connection_uri(service, created["id"])
    with psycopg.connect(uri) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 'through a stop' AS note")

    stopping = service.request("POST", f"/databases/{created['id']}/stop")
    assert stopping.status_code == 202, stopping.text
    assert stopping.json()["status"] == "stopping"
    service.wait_for_status(created["id"], "stopped", timeout=40)

    state = container_of(docker_client, created["id"]).attrs["State"]
    # No process, so no memory held; the container and its volume stay.
    assert state["Running"] is False and state["Pid"] == 0, state
    docker_client.volumes.get(f"dbprov-{created['id']}-data")
    assert refuses_connections(uri)

    # Drift repair restarts servers that should run; a stopped one should not.
    time.sleep(3 * RECONCILE_INTERVAL)
    assert record(service, created["id"])["status"] == "stopped"
    assert container_of(docker_client, created["id"]).attrs["State"]["Running"] is False

    before = kinds(service, created["id"])
    again = service.request("POST", f"/databases/{created['id']}/stop")
    assert_conflict(again, "stopped")
    assert record(service, created["id"])["status"] == "stopped"
    assert kinds(service, created["id"]) == before

    started = service.request("POST", f"/databases/{created['id']}/start")
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "ready"
    assert started.json()["port"] == created["port"]
    assert connection_uri(service, created["id"]) == uri
    assert container_of(docker_client, created["id"]).attrs["State"]["Running"] is True
    with psycopg.connect(uri) as conn:
        assert conn.execute("SELECT note FROM kept").fetchone() == ("through a stop",)

    before = kinds(service, created["id"])
    again = service.request("POST", f"/databases/{created['id']}/start")
    assert_conflict(again, "ready")
    assert record(service, created["id"])["status"] == "ready"
    assert kinds(service, created["id"]) == before
    with psycopg.connect(uri) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- idempotent creates -------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store_service(request):
    """The service on each metadata store: SQLite serialises writers, PostgreSQL
    lets the racing creates meet at its unique constraints."""
    env = {}
    if request.param == "postgresql":
        # Before ``serve``, so that the store outlives the service's teardown.
        env["DBPROV_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    return request.getfixturevalue("serve")(env)


def test_concurrent_retries_with_one_idempotency_key_make_one_database(any_store_service, docker_client):
    service = any_store_service
    body = {"version": "17", "parameters": {"work_mem": "4MB"}}
    key = {"Idempotency-Key": "lifecycle-retry-1"}
    clients = 8
    barrier = threading.Barrier(clients)

    def post():
        # All at the same moment, as a client's retries after a timeout might be.
        barrier.wait(timeout=30)
        return service.request("POST", "/databases", json=body, headers=key)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        responses = list(pool.map(lambda _: post(), range(clients)))

    assert [r.status_code for r in responses] == [201] * clients, [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert len({a["id"] for a in answers}) == 1, answers
    assert len({a["connection_uri"] for a in answers}) == 1
    database_id = answers[0]["id"]
    containers = [c for c in managed(docker_client) if c.labels["io.dbprov.database-id"] == database_id]
    assert len(containers) == 1
    # The losers left nothing either: no second record, no second server.
    assert total(service) == 1
    assert len(managed(docker_client)) == 1
    assert kinds(service, database_id).count("requested") == 1
    with psycopg.connect(answers[0]["connection_uri"]) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("4MB",)

    different = service.request("POST", "/databases", json={**body, "version": "15"}, headers=key)
    assert different.status_code == 422, different.text
    assert different.headers["Content-Type"] == "application/problem+json"
    assert "Idempotency-Key" in different.json()["errors"]["headers"]
    assert total(service) == 1

    other = create(service, headers={"Idempotency-Key": "lifecycle-retry-2"}, **body)
    assert other["id"] != database_id
    assert total(service) == 2
    assert len(managed(docker_client)) == 2


# -- events and logs ----------------------------------------------------------


def test_events_tell_a_database_life_in_order(service):
    created = create(service)
    assert service.request("POST", f"/databases/{created['id']}/stop").status_code == 202
    service.wait_for_status(created["id"], "stopped", timeout=40)
    assert service.request("POST", f"/databases/{created['id']}/start").status_code == 200
    assert service.request("DELETE", f"/databases/{created['id']}").status_code == 202
    service.wait_for_status(created["id"], "deleted")

    history = events(service, created["id"])
    assert [e["kind"] for e in history] == [
        "requested", "provisioning", "ready",
        "stopping", "stopped", "starting", "started",
        "deleting", "deleted",
    ], history
    times = [moment(e["at"]) for e in history]
    assert times == sorted(times), history
    assert all(e["database_id"] == created["id"] for e in history)
    # Asked for through the API, done by the reconciler.
    actors = {e["kind"]: e["actor"] for e in history}
    assert actors["stopped"] == actors["started"] == actors["deleted"] == "service"
    # Without authentication the caller is "local".
    assert actors["requested"] == actors["stopping"] == actors["starting"] == actors["deleting"] == "local"


def test_logs_show_the_tail_of_the_server_log(service):
    created = create(service)
    response = service.request("GET", f"/databases/{created['id']}/logs", params={"tail": 20})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "database system is ready to accept connections" in response.text
    assert 0 < len(response.text.splitlines()) <= 20

    one = service.request("GET", f"/databases/{created['id']}/logs", params={"tail": 1})
    assert one.status_code == 200
    assert len(one.text.splitlines()) == 1


# -- plans, settings and extensions -------------------------------------------


SMALL_PLAN = {"small": {"memory": "256m", "cpus": 0.5, "settings": {"max_connections": "20"}}}


@pytest.fixture
def plans_service(serve):
    return serve({"DBPROV_PLANS": json.dumps(SMALL_PLAN)})


def test_a_plan_sizes_the_container_and_sets_the_server(plans_service, docker_client):
    listed = plans_service.request("GET", "/plans")
    assert listed.status_code == 200, listed.text
    plans = {plan["name"]: plan for plan in listed.json()["items"]}
    assert set(plans) == {"default", "small"}
    assert plans["small"] == {
        "name": "small", "memory": "256m", "cpus": 0.5, "settings": {"max_connections": "20"},
    }

    created = create(plans_service, plan="small")
    assert created["plan"] == "small"
    host_config = container_of(docker_client, created["id"]).attrs["HostConfig"]
    assert host_config["Memory"] == 256 * 2**20
    assert host_config["NanoCpus"] == 500_000_000
    with psycopg.connect(created["connection_uri"]) as conn:
        assert conn.execute("SHOW max_connections").fetchone() == ("20",)


def test_a_database_that_need_not_be_durable_does_not_sync_and_keeps_its_data_over_a_restart(
    service, docker_client
):
    created = create(service, durable=False)
    assert created["durable"] is False
    with psycopg.connect(created["connection_uri"], autocommit=True) as conn:
        # A commit still reaches the kernel before it returns: a kill of the server loses none.
        assert [conn.execute(f"SHOW {name}").fetchone()[0] for name in
                ("fsync", "full_page_writes", "synchronous_commit")] == ["off", "off", "on"]
        # The tenant cannot turn it on for the server, only for its session.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER SYSTEM SET fsync = on")
        conn.execute("CREATE TABLE kept AS SELECT generate_series(1, 1000) AS n")
    # A kill of the server (not of the machine) loses nothing: the page cache holds it.
    container_of(docker_client, created["id"]).kill()
    with connected(created["connection_uri"], what="the database") as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1000,)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)


def test_settings_and_extensions_are_in_effect_for_the_tenant(service, docker_client):
    created = create(
        service,
        parameters={"statement_timeout": "1234ms", "work_mem": "8MB"},
        extensions=["pg_trgm", "citext"],
    )
    assert created["parameters"] == {"statement_timeout": "1234ms", "work_mem": "8MB"}
    assert created["extensions"] == ["pg_trgm", "citext"]
    with psycopg.connect(created["connection_uri"]) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
        installed = {row[0] for row in conn.execute("SELECT extname FROM pg_extension")}
        assert {"pg_trgm", "citext"} <= installed
        assert conn.execute("SELECT similarity('abc', 'abd')").fetchone()[0] > 0
        assert conn.execute("SELECT 'MiXeD'::citext = 'mixed'::citext").fetchone() == (True,)

    # A server-wide setting, and an untrusted language: refused before anything is recorded.
    recorded, servers = total(service), managed_ids(docker_client)
    for body, named in (
        ({"parameters": {"shared_buffers": "64MB"}}, "shared_buffers"),
        ({"extensions": ["plpython3u"]}, "plpython3u"),
    ):
        response = service.request("POST", "/databases", json=body)
        assert response.status_code == 422, response.text
        assert response.headers["Content-Type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == "urn:dbprov:problem:validation-error"
        assert named in problem["detail"], problem
        assert total(service) == recorded
        assert managed_ids(docker_client) == servers

