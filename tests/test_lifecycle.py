"""A database's life between create and delete, on a fake runtime: expiry,
protection, stop and start, the idle stop, idempotent creates, events, logs,
plans, settings and extensions."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pytest

from service.app import create_app
from service.domain.models import Database, Status, utcnow
from service.domain.tenancy import LOCAL_ADMIN
from service.errors import EngineError
from service.runtime.protocol import RUNNING, STOPPED
from service.settings import Plan

from .fakes import AWAY
from .test_api import assert_problem, count_records
from .test_tenancy import api, token  # noqa: F401 - fixtures

ASYNC = {"Prefer": "respond-async"}


def record(services, database_id: str) -> Database:
    with services.store.read() as session:
        return session.get(Database, database_id)


def kinds(client, database_id: str, headers=None) -> list[str]:
    response = client.get(f"/databases/{database_id}/events", headers=headers or {})
    assert response.status_code == 200, response.get_json()
    return [event["kind"] for event in response.get_json()["items"]]


def use_settings(services, settings) -> None:
    services.settings = services.databases.settings = services.tenants.settings = settings


def make_client(services, settings):
    """A client of an app on ``services`` with other settings, authentication off."""
    use_settings(services, settings)
    services.auth_required = False
    return create_app(services).test_client()


# -- expiry and protection ---------------------------------------------------------


def test_a_ttl_sets_the_expiry_and_the_reconciler_deletes_it_when_due(client, services, reconciler):
    created = client.post("/databases", json={"ttl": 60}, headers=ASYNC).get_json()
    expires = record(services, created["id"]).expires_at
    assert timedelta(seconds=58) < expires - utcnow() <= timedelta(seconds=60)
    assert created["expires_at"] is not None
    reconciler.run_once(wait=True)
    assert record(services, created["id"]).status == Status.READY
    services.records.transition(created["id"], set(Status), expires_at=utcnow() - timedelta(seconds=1))
    reconciler.run_once(wait=True)
    gone = record(services, created["id"])
    assert gone.status == Status.DELETED
    assert kinds(client, created["id"])[-2:] == ["expired", "deleted"]


def test_renewal_moves_the_expiry_and_null_removes_it(client, services):
    created = client.post("/databases", json={"ttl": 60}, headers=ASYNC).get_json()
    renewed = client.patch(f"/databases/{created['id']}", json={"ttl": 3600}).get_json()
    assert record(services, created["id"]).expires_at - utcnow() > timedelta(seconds=3500)
    assert renewed["expires_at"] != created["expires_at"]
    at = (utcnow() + timedelta(days=1)).isoformat()
    assert client.patch(f"/databases/{created['id']}", json={"expires_at": at}).status_code == 200
    cleared = client.patch(f"/databases/{created['id']}", json={"expires_at": None}).get_json()
    assert cleared["expires_at"] is None
    assert kinds(client, created["id"]).count("updated") == 3


@pytest.mark.parametrize(
    "body, field",
    [
        ({"ttl": 60, "expires_at": "2099-01-01T00:00:00+00:00"}, "ttl"),
        ({"expires_at": "2001-01-01T00:00:00+00:00"}, "expires_at"),
        ({"expires_at": "2099-01-01T00:00:00"}, "expires_at"),  # no offset: a guess
        ({"ttl": 0}, "ttl"),
        ({"ttl": "60"}, "ttl"),
    ],
)
def test_a_bad_expiry_is_refused_and_records_nothing(client, services, body, field):
    problem = assert_problem(client.post("/databases", json=body), 422, "validation-error")
    assert field in problem["errors"]["json"]
    assert count_records(services) == 0


def test_max_ttl_caps_every_expiry_and_forbids_removing_it(services, settings):
    client = make_client(services, dataclasses.replace(settings, max_ttl=600.0))
    unasked = client.post("/databases", json={}, headers=ASYNC).get_json()
    assert record(services, unasked["id"]).expires_at - utcnow() <= timedelta(seconds=600)
    problem = assert_problem(client.post("/databases", json={"ttl": 601}), 422, "validation-error")
    assert "DBPROV_MAX_TTL" in problem["detail"]
    removal = client.patch(f"/databases/{unasked['id']}", json={"expires_at": None})
    assert_problem(removal, 403, "forbidden")
    assert client.patch(f"/databases/{unasked['id']}", json={"ttl": 300}).status_code == 200


def test_default_ttl_applies_when_a_create_names_none(services, settings):
    client = make_client(services, dataclasses.replace(settings, default_ttl=120.0))
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    assert timedelta(seconds=118) < record(services, created["id"]).expires_at - utcnow() <= timedelta(seconds=120)


def test_a_protected_database_refuses_delete_and_expiry(client, services, reconciler):
    created = client.post("/databases", json={"protected": True, "ttl": 60}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    problem = assert_problem(client.delete(f"/databases/{created['id']}"), 409, "conflict")
    assert '{"protected": false}' in problem["detail"]
    services.records.transition(created["id"], set(Status), expires_at=utcnow() - timedelta(seconds=1))
    reconciler.run_once(wait=True)
    assert record(services, created["id"]).status == Status.READY
    assert client.patch(f"/databases/{created['id']}", json={"protected": False}).get_json()["protected"] is False
    reconciler.run_once(wait=True)  # now it expires
    assert record(services, created["id"]).status == Status.DELETED


# -- stop and start ----------------------------------------------------------------


def test_stop_keeps_data_and_port_and_start_brings_it_back(client, services, reconciler, runtime):
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    stopping = client.post(f"/databases/{created['id']}/stop")
    assert stopping.status_code == 202 and stopping.get_json()["status"] == "stopping"
    reconciler.run_once(wait=True)
    stopped = record(services, created["id"])
    assert stopped.status == Status.STOPPED and stopped.host_port == created["port"]
    assert runtime.servers[created["id"]].state == STOPPED and created["id"] in runtime.data
    reconciler.run_once(wait=True)  # drift repair leaves a stopped database alone
    assert runtime.servers[created["id"]].state == STOPPED
    assert_problem(client.post(f"/databases/{created['id']}/stop"), 409, "conflict")

    starting = client.post(f"/databases/{created['id']}/start", headers=ASYNC)
    assert starting.status_code == 202 and starting.get_json()["status"] == "starting"
    reconciler.run_once(wait=True)
    ready = record(services, created["id"])
    assert ready.status == Status.READY and ready.host_port == created["port"]
    assert runtime.servers[created["id"]].state == RUNNING
    assert_problem(client.post(f"/databases/{created['id']}/start"), 409, "conflict")
    assert kinds(client, created["id"]) == [
        "requested", "provisioning", "ready", "stopping", "stopped", "starting", "started",
    ]


def test_a_failed_database_whose_data_is_kept_can_be_started(client, services, reconciler, runtime):
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    runtime.data[created["id"]] = "orders"
    client.post(f"/databases/{created['id']}/stop")
    reconciler.run_once(wait=True)
    # Its start misses the ready timeout (slow crash recovery, say).
    services.server_admin.starting_up = True
    client.post(f"/databases/{created['id']}/start", headers=ASYNC)
    reconciler.run_once(wait=True)
    failed = client.get(f"/databases/{created['id']}").get_json()
    assert failed["status"] == "failed" and "Its data is kept" in failed["last_error"]
    assert runtime.data[created["id"]] == "orders"

    services.server_admin.starting_up = False
    starting = client.post(f"/databases/{created['id']}/start", headers=ASYNC)
    assert starting.status_code == 202 and starting.get_json()["status"] == "starting"
    reconciler.run_once(wait=True)
    ready = client.get(f"/databases/{created['id']}").get_json()
    assert ready["status"] == "ready" and ready["port"] is not None and ready["last_error"] is None
    assert runtime.data[created["id"]] == "orders"
    assert client.get(f"/databases/{created['id']}/credentials").get_json()["password"] == created["password"]


def test_a_failed_database_that_never_held_data_cannot_be_started(client, services, reconciler):
    services.server_admin.starting_up = True
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    assert client.get(f"/databases/{created['id']}").get_json()["status"] == "failed"
    problem = assert_problem(client.post(f"/databases/{created['id']}/start"), 409, "conflict")
    assert "before it held any data" in problem["detail"]


def test_data_removed_behind_the_services_back_is_lost_never_an_empty_ready_database(
    client, services, reconciler, runtime
):
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    runtime.data[created["id"]] = "orders"
    snapshot = client.post(f"/databases/{created['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    client.post(f"/databases/{created['id']}/stop")
    reconciler.run_once(wait=True)
    # `docker system prune --volumes`: a stopped container and its volume go.
    del runtime.servers[created["id"]], runtime.data[created["id"]]
    client.post(f"/databases/{created['id']}/start", headers=ASYNC)
    reconciler.run_once(wait=True)
    lost = client.get(f"/databases/{created['id']}").get_json()
    assert lost["status"] == "lost" and "is gone" in lost["last_error"] and "reset" in lost["last_error"]
    assert created["id"] not in runtime.servers and created["id"] not in runtime.data
    assert kinds(client, created["id"])[-2:] == ["starting", "lost"]
    # The way back: a reset to its snapshot.
    back = client.post(f"/databases/{created['id']}/reset", json={"snapshot": snapshot["id"]}, headers=ASYNC)
    assert back.status_code == 202, back.get_json()
    reconciler.run_once(wait=True)
    assert client.get(f"/databases/{created['id']}").get_json()["status"] == "ready"
    assert runtime.data[created["id"]] == "orders"


def test_a_running_database_whose_server_and_data_vanish_is_lost(client, services, reconciler, runtime):
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    del runtime.servers[created["id"]], runtime.data[created["id"]]
    reconciler.run_once(wait=True)
    reconciler.run_once(wait=True)
    assert client.get(f"/databases/{created['id']}").get_json()["status"] == "lost"
    assert created["id"] not in runtime.servers
    # Only its server gone, its data kept: made anew on that data.
    other = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    runtime.data[other["id"]] = "kept"
    del runtime.servers[other["id"]]
    for _ in range(3):
        reconciler.run_once(wait=True)
    assert client.get(f"/databases/{other['id']}").get_json()["status"] == "ready"
    assert runtime.data[other["id"]] == "kept"
    assert client.delete(f"/databases/{created['id']}").status_code == 202


def test_start_waits_until_ready_like_a_create(client, running):
    created = client.post("/databases", json={}).get_json()
    client.post(f"/databases/{created['id']}/stop")
    for _ in range(100):
        if client.get(f"/databases/{created['id']}").get_json()["status"] == "stopped":
            break
        running.records.changed.wait(0.05)
    started = client.post(f"/databases/{created['id']}/start")
    assert started.status_code == 200 and started.get_json()["status"] == "ready"


def test_a_database_without_clients_is_stopped_after_the_idle_time(services, settings, runtime):
    use_settings(services, dataclasses.replace(settings, idle_stop=0.2))
    reconciler = services.reconciler()
    try:
        idle = services.databases.create(LOCAL_ADMIN)
        busy = services.databases.create(LOCAL_ADMIN)
        reconciler.run_once(wait=True)
        services.server_admin.clients[record(services, busy.id).host_port] = 2
        services.records.transition(idle.id, {Status.READY}, active_at=utcnow() - timedelta(seconds=1))
        services.records.transition(busy.id, {Status.READY}, active_at=utcnow() - timedelta(seconds=1))
        reconciler.run_once(wait=True)
        assert record(services, idle.id).status == Status.STOPPED
        assert runtime.servers[idle.id].state == STOPPED
        assert record(services, busy.id).status == Status.READY
        assert record(services, busy.id).active_at > utcnow() - timedelta(seconds=1)
        # A client that came and went between two counts is activity too.
        port = record(services, busy.id).host_port
        services.server_admin.clients[port] = 0
        services.server_admin.sessions[port] = 7
        services.records.transition(busy.id, {Status.READY}, active_at=utcnow() - timedelta(seconds=1))
        reconciler._upkeep._idle_checked.clear()
        reconciler.run_once(wait=True)
        assert record(services, busy.id).status == Status.READY
        assert record(services, busy.id).active_at > utcnow() - timedelta(seconds=1)
        # Nothing since: it stops.
        services.records.transition(busy.id, {Status.READY}, active_at=utcnow() - timedelta(seconds=1))
        reconciler._upkeep._idle_checked.clear()
        reconciler.run_once(wait=True)
        assert record(services, busy.id).status == Status.STOPPED
    finally:
        reconciler.stop()


def test_a_client_that_connects_while_the_idle_stop_checkpoints_keeps_the_server_up(
    services, settings, runtime, monkeypatch
):
    use_settings(services, dataclasses.replace(settings, idle_stop=0.2))
    reconciler = services.reconciler()
    try:
        database = services.databases.create(LOCAL_ADMIN)
        reconciler.run_once(wait=True)
        port = record(services, database.id).host_port
        checkpoint = services.server_admin.checkpoint

        def a_client_comes(admin):
            checkpoint(admin)
            services.server_admin.clients[port] = 1

        monkeypatch.setattr(services.server_admin, "checkpoint", a_client_comes)
        services.records.transition(database.id, {Status.READY}, active_at=utcnow() - timedelta(seconds=1))
        reconciler.run_once(wait=True)
        # The last count came after the checkpoint, right before the stop.
        assert services.server_admin.checkpoints == 1
        assert record(services, database.id).status == Status.READY
        assert runtime.servers[database.id].state == RUNNING
        assert record(services, database.id).active_at > utcnow() - timedelta(seconds=1)
    finally:
        reconciler.stop()


def test_idle_stop_comes_from_the_create_the_plan_or_the_setting_and_a_patch_changes_it(services, settings):
    plans = {"quiet": Plan("quiet", "256m", idle_stop=60)}
    client = make_client(services, dataclasses.replace(settings, idle_stop=600, plans=plans))
    made = {
        name: client.post("/databases", json=body, headers=ASYNC).get_json()
        for name, body in (("default", {}), ("plan", {"plan": "quiet"}), ("own", {"idle_stop": 5}),
                           ("never", {"idle_stop": None}))
    }
    assert {name: body["idle_stop"] for name, body in made.items()} == {
        "default": 600, "plan": 60, "own": 5, "never": None}
    database_id = made["default"]["id"]
    changed = client.patch(f"/databases/{database_id}", json={"idle_stop": None})
    assert changed.status_code == 200 and changed.get_json()["idle_stop"] is None
    assert record(services, database_id).idle_stop is None
    assert kinds(client, database_id)[-1] == "updated"
    # Nonsense is refused, naming the field, and changes nothing.
    for body in ({"idle_stop": 0}, {"idle_stop": "soon"}, {"idle_stop": 1.5}):
        for response in (client.post("/databases", json=body),
                         client.patch(f"/databases/{database_id}", json=body)):
            assert_problem(response, 422, "validation-error")
            assert "idle_stop" in response.get_json()["detail"]
    assert record(services, database_id).idle_stop is None


def test_a_sleeping_database_is_started_by_a_start_stopped_by_a_stop_and_copied_asleep(
    client, services, reconciler, runtime
):
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    # Asleep as the idle check leaves it where the service holds ports.
    services.records.transition(created["id"], {Status.READY}, status=Status.SLEEPING, event="slept")
    runtime.stop_server(created["id"])
    snapshot = client.post(f"/databases/{created['id']}/snapshots", headers=ASYNC)
    assert snapshot.status_code == 202, snapshot.get_json()
    reconciler.run_once(wait=True)
    assert client.get(f"/snapshots/{snapshot.get_json()['id']}").get_json()["status"] == "ready"
    # The copy did not wake it.
    assert record(services, created["id"]).status == Status.SLEEPING
    assert runtime.servers[created["id"]].state == STOPPED
    assert_problem(client.get(f"/databases/{created['id']}/dump"), 409, "conflict")
    started = client.post(f"/databases/{created['id']}/start", headers=ASYNC)
    assert started.status_code == 202 and started.get_json()["status"] == "waking"
    # Asked again meanwhile: the same wake.
    assert client.post(f"/databases/{created['id']}/start", headers=ASYNC).get_json()["status"] == "waking"
    reconciler.run_once(wait=True)
    assert record(services, created["id"]).status == Status.READY
    assert kinds(client, created["id"])[-1] == "woken" and kinds(client, created["id"]).count("woken") == 1
    services.records.transition(created["id"], {Status.READY}, status=Status.SLEEPING, event="slept")
    client.post(f"/databases/{created['id']}/stop")
    reconciler.run_once(wait=True)
    assert record(services, created["id"]).status == Status.STOPPED


def test_a_wake_that_fails_for_a_passing_reason_sleeps_again_and_tells_its_client_why(
    client, services, runtime, monkeypatch
):
    # The service holds a sleeping database's port here, on loopback.
    runtime.publishes_here = True
    reconciler = services.reconciler()
    try:
        created = client.post("/databases", json={}, headers=ASYNC).get_json()
        reconciler.run_once(wait=True)
        services.records.transition(created["id"], {Status.READY}, status=Status.SLEEPING, event="slept")
        runtime.stop_server(created["id"])
        reconciler.run_once(wait=True)
        port = record(services, created["id"]).host_port
        assert reconciler._sleepers.holds(created["id"])

        def engine_fails(spec):
            raise EngineError("the engine failed the start: 500 Server Error (a passing one)")

        monkeypatch.setattr(runtime, "ensure_server", engine_fails)
        # The client that woke it is told why, in PostgreSQL's words, not refused.
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(f"postgresql://app:x@127.0.0.1:{port}/app?sslmode=disable", connect_timeout=10)
        assert f"database {created['id']} cannot take connections: it could not be woken: the engine failed" \
            in str(refused.value)
        asleep = record(services, created["id"])
        assert asleep.status == Status.SLEEPING and "500 Server Error" in asleep.last_error
        assert kinds(client, created["id"])[-2:] == ["slept", "wake-failed"]
        # Its port held again at the next pass, for the next connection.
        reconciler.run_once(wait=True)
        assert reconciler._sleepers.holds(created["id"])
        monkeypatch.undo()
        assert client.post(f"/databases/{created['id']}/start", headers=ASYNC).get_json()["status"] == "waking"
        reconciler.run_once(wait=True)
        woken = record(services, created["id"])
        assert woken.status == Status.READY and woken.last_error is None
        assert kinds(client, created["id"])[-1] == "woken"
    finally:
        reconciler.stop()


# -- a machine that is away (a Swarm node down) ------------------------------------------


def test_an_unavailable_database_says_why_refuses_changes_and_can_be_deleted(
    client, services, reconciler, runtime
):
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    snapshot = client.post(f"/databases/{created['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    runtime.away.add(created["id"])
    reconciler.run_once(wait=True)
    shown = client.get(f"/databases/{created['id']}").get_json()
    assert shown["status"] == "unavailable" and shown["last_error"] == AWAY
    assert [d["id"] for d in client.get("/databases?status=unavailable").get_json()["items"]] == [created["id"]]
    page = client.get(f"/ui/databases/{created['id']}").get_data(as_text=True)
    assert 'class="status s-unavailable"' in page and AWAY in page

    for method, path, body in [
        ("post", "stop", None), ("post", "start", None), ("post", "credentials/rotate", None),
        ("post", "snapshots", None), ("post", "reset", {"snapshot": snapshot["id"]}), ("get", "dump", None),
    ]:
        refused = getattr(client, method)(f"/databases/{created['id']}/{path}", json=body)
        assert "is unavailable" in assert_problem(refused, 409, "conflict")["detail"], path
    assert record(services, created["id"]).status == Status.UNAVAILABLE

    deleting = client.delete(f"/databases/{created['id']}")
    assert deleting.status_code == 202 and deleting.get_json()["status"] == "deleting"
    runtime.away.clear()
    services.records.transition(created["id"], set(Status), next_attempt_at=None)
    reconciler.run_once(wait=True)
    assert record(services, created["id"]).status == Status.DELETED


def test_connection_info_names_the_node_on_swarm_and_the_public_host_on_docker(
    services, settings, reconciler
):
    for runtime_name, host in (("docker", "localhost"), ("swarm", "db-2.example.test")):
        client = make_client(services, dataclasses.replace(settings, runtime=runtime_name))
        created = client.post("/databases", json={}, headers=ASYNC).get_json()
        reconciler.run_once(wait=True)
        # Where the runtime said the server answers: its node's public name on Swarm.
        services.records.transition(created["id"], set(Status), server_host="db-2.example.test")
        assert client.get(f"/databases/{created['id']}").get_json()["host"] == host
        credentials = client.get(f"/databases/{created['id']}/credentials").get_json()
        assert credentials["host"] == host
        assert f"@{host}:{created['port']}/app" in credentials["connection_uri"]
        assert f"<dd>{host}</dd>" in client.get(f"/ui/databases/{created['id']}").get_data(as_text=True)


# -- idempotent creates -------------------------------------------------------------


def test_the_same_key_and_body_answer_the_same_database(client, services):
    headers = {**ASYNC, "Idempotency-Key": "job-42"}
    first = client.post("/databases", json={"name": "ci"}, headers=headers)
    again = client.post("/databases", json={"name": "ci"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert count_records(services) == 1
    other = assert_problem(
        client.post("/databases", json={"name": "cd"}, headers=headers), 422, "validation-error"
    )
    assert "Idempotency-Key" in other["detail"]
    fresh = client.post("/databases", json={}, headers={**ASYNC, "Idempotency-Key": "job-43"})
    assert fresh.get_json()["id"] != first.get_json()["id"]
    assert count_records(services) == 2


def test_a_retry_after_deletion_answers_the_deleted_database(client, running):
    headers = {"Idempotency-Key": "once"}
    created = client.post("/databases", json={}, headers=headers)
    client.delete(f"/databases/{created.get_json()['id']}")
    for _ in range(100):
        if client.get(f"/databases/{created.get_json()['id']}").get_json()["status"] == "deleted":
            break
        running.records.changed.wait(0.05)
    again = client.post("/databases", json={}, headers=headers)
    assert again.status_code == 201 and again.get_json()["status"] == "deleted"
    assert again.get_json()["id"] == created.get_json()["id"]


def test_concurrent_retries_make_one_database(client, services):
    headers = {**ASYNC, "Idempotency-Key": "retry-storm"}
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: client.post("/databases", json={}, headers=headers), range(6)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.get_json()["id"] for a in answers}) == 1
    assert count_records(services) == 1


def test_keys_are_per_tenant_and_forgotten_after_their_retention(api, services, token):
    alice, bob = token("alice"), token("bob")
    first = api.post("/databases", json={}, headers={**alice, **ASYNC, "Idempotency-Key": "k"}).get_json()
    other = api.post("/databases", json={}, headers={**bob, **ASYNC, "Idempotency-Key": "k"}).get_json()
    assert first["id"] != other["id"]
    assert services.records.purge(event_retention=1e9, key_retention=0) == (0, 2)
    again = api.post("/databases", json={}, headers={**alice, **ASYNC, "Idempotency-Key": "k"}).get_json()
    assert again["id"] != first["id"]


def test_a_malformed_key_is_refused(client, services):
    malformed = client.post("/databases", json={}, headers={"Idempotency-Key": "a b"})
    assert_problem(malformed, 422, "validation-error")
    assert count_records(services) == 0


# -- events and logs -------------------------------------------------------------------


def test_events_are_tenant_scoped_and_admins_read_them_all(api, services, token, running):
    alice, admin = token("alice"), token("ops", admin=True)
    created = api.post("/databases", json={}, headers=alice).get_json()
    events = api.get(f"/databases/{created['id']}/events", headers=alice).get_json()["items"]
    assert [e["kind"] for e in events] == ["requested", "provisioning", "ready"]
    assert events[0]["actor"].startswith("token:") and events[-1]["actor"] == "service"
    assert_problem(api.get(f"/databases/{created['id']}/events", headers=token("bob")), 404, "not-found")
    assert_problem(api.get("/events", headers=alice), 403, "forbidden")
    everything = api.get("/events", headers=admin).get_json()["items"]
    assert {e["database_id"] for e in everything} == {created["id"]}
    later = api.get("/events", headers=admin, query_string={"since": "2999-01-01T00:00:00+00:00"})
    assert later.get_json()["items"] == []


def test_rotation_and_deletion_are_events_and_outlive_the_database(client, running):
    created = client.post("/databases", json={}).get_json()
    client.post(f"/databases/{created['id']}/credentials/rotate")
    client.delete(f"/databases/{created['id']}")
    running.wait_idle()
    for _ in range(100):
        if client.get(f"/databases/{created['id']}").get_json()["status"] == "deleted":
            break
        running.records.changed.wait(0.05)
    assert kinds(client, created["id"])[-3:] == ["credentials-rotated", "deleting", "deleted"]


def test_logs_come_from_the_server_or_from_the_failure(client, running, runtime):
    created = client.post("/databases", json={}).get_json()
    runtime.servers[created["id"]].logs = "one\ntwo\nthree\n"
    logs = client.get(f"/databases/{created['id']}/logs", query_string={"tail": 2})
    assert logs.status_code == 200 and logs.mimetype == "text/plain"
    assert "three" in logs.get_data(as_text=True)
    runtime.crashing_images["postgres:15"] = "FATAL: broken on purpose"
    failed = client.post("/databases", json={"version": "15"}).get_json()
    text = client.get(f"/databases/{failed['database_id']}/logs").get_data(as_text=True)
    assert "broken on purpose" in text


# -- plans, settings and extensions --------------------------------------------------------


@pytest.fixture
def planned(services, settings):
    plans = {"small": Plan("small", "256m", 0.5, {"max_connections": "20"})}
    return make_client(services, dataclasses.replace(settings, plans=plans))


def test_plans_are_listed_and_shape_the_server(planned, services, runtime):
    listed = planned.get("/plans").get_json()["items"]
    assert [p["name"] for p in listed] == ["default", "small"]
    assert listed[1] == {"name": "small", "memory": "256m", "cpus": 0.5, "settings": {"max_connections": "20"}}
    reconciler = services.reconciler()
    try:
        created = planned.post("/databases", json={"plan": "small"}, headers=ASYNC).get_json()
        reconciler.run_once(wait=True)
    finally:
        reconciler.stop()
    spec = runtime.servers[created["id"]].spec
    assert spec.memory_limit == "256m" and spec.cpus == 0.5
    assert spec.command[-2:] == ("-c", "max_connections=20")
    assert created["plan"] == "small"
    assert_problem(planned.post("/databases", json={"plan": "huge"}), 422, "validation-error")


def test_a_database_that_need_not_be_durable_has_a_server_that_does_not_sync(planned, services, runtime):
    reconciler = services.reconciler()
    try:
        fast = planned.post("/databases", json={"plan": "small", "durable": False}, headers=ASYNC).get_json()
        durable = planned.post("/databases", json={}, headers=ASYNC).get_json()
        reconciler.run_once(wait=True)
    finally:
        reconciler.stop()
    assert (fast["durable"], durable["durable"]) == (False, True)
    assert planned.get(f"/databases/{fast['id']}").get_json()["durable"] is False
    # After the plan's settings, so that no plan turns it back on.
    assert runtime.servers[fast["id"]].spec.command[-4:] == ("-c", "fsync=off", "-c", "full_page_writes=off")
    assert not any("fsync" in arg for arg in runtime.servers[durable["id"]].spec.command)
    # Only a JSON boolean: a string is refused and records nothing.
    before = count_records(services)
    assert_problem(planned.post("/databases", json={"durable": "no"}), 422, "validation-error")
    assert count_records(services) == before


def test_a_tenant_may_be_held_to_some_plans(api, services, token, settings):
    use_settings(services, dataclasses.replace(settings, plans={"small": Plan("small", "256m")}))
    headers = token("classroom")
    services.tenants.set_plans("classroom", ["small"])
    assert_problem(api.post("/databases", json={}, headers=headers), 403, "forbidden")
    assert api.post("/databases", json={"plan": "small"}, headers={**headers, **ASYNC}).status_code == 202


def test_settings_and_extensions_are_applied_inside_the_server(client, services, running):
    created = client.post(
        "/databases",
        json={"parameters": {"statement_timeout": "5s"}, "extensions": ["pg_trgm", "citext"]},
    ).get_json()
    assert created["status"] == "ready"
    assert services.server_admin.settings[created["port"]] == {"statement_timeout": "5s"}
    assert services.server_admin.extensions[created["port"]] == ["pg_trgm", "citext"]
    assert created["parameters"] == {"statement_timeout": "5s"}


@pytest.mark.parametrize(
    "body, named",
    [
        ({"parameters": {"shared_buffers": "1GB"}}, "shared_buffers"),
        ({"extensions": ["plpython3u"]}, "plpython3u"),
        ({"extensions": ["Robert'); DROP"]}, None),
        # Allowed settings, with values the server would refuse.
        ({"parameters": {"work_mem": "lots"}}, "work_mem"),
        ({"parameters": {"statement_timeout": "5 fortnights"}}, "statement_timeout"),
        ({"parameters": {"jit": "maybe"}}, "jit"),
        ({"parameters": {"timezone": "Mars/Olympus"}}, "timezone"),
        ({"parameters": {"maintenance_work_mem": "100kB"}, "version": "15"}, "maintenance_work_mem"),
    ],
)
def test_anything_else_is_refused_before_anything_starts(client, services, runtime, body, named):
    problem = assert_problem(client.post("/databases", json=body), 422, "validation-error")
    if named:
        assert named in str(problem["errors"])
    assert count_records(services) == 0 and runtime.servers == {}
