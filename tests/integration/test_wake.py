"""Scale to zero on the real engine: an idle database sleeps, and its first
connection, with the URI unchanged, wakes it."""

from __future__ import annotations

import signal
import socket
import threading
import time

import psycopg
import pytest

from .conftest import kinds, metric, wait_until

pytestmark = pytest.mark.docker


def running(docker_client, database_id: str) -> bool:
    containers = docker_client.containers.list(filters={"label": f"io.dbprov.database-id={database_id}"})
    return any(c.status == "running" for c in containers)


def connect_all(uri: str, count: int) -> list:
    """``count`` clients connecting at once; each one's first SELECT 1, or its error."""
    results: list = [None] * count
    start = threading.Barrier(count)

    def one(i: int) -> None:
        start.wait()
        try:
            with psycopg.connect(uri, connect_timeout=60) as conn:
                results[i] = conn.execute("SELECT 1").fetchone()
        except psycopg.Error as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return results


def test_an_idle_database_sleeps_and_its_first_connections_wake_it(serve, docker_client):
    service = serve({"DBPROV_IDLE_STOP": "2"})
    idle = service.request("POST", "/databases", json={}).json()
    never = service.request("POST", "/databases", json={"idle_stop": None}).json()
    assert idle["idle_stop"] == 2 and never["idle_stop"] is None
    # An idle-in-transaction session is a client: it keeps the database awake.
    busy = service.request("POST", "/databases", json={"idle_stop": 1}).json()
    with psycopg.connect(busy["connection_uri"]) as held:
        held.execute("SELECT 1")  # the transaction stays open
        asleep = service.wait_for_status(idle["id"], "sleeping", timeout=15)
        wait_until(lambda: not running(docker_client, idle["id"]), timeout=10, what="server stopped")
        assert service.request("GET", f"/databases/{busy['id']}").json()["status"] == "ready"
    assert service.request("GET", f"/databases/{never['id']}").json()["status"] == "ready"
    assert asleep["port"] == idle["port"]
    assert metric(service, "dbprov_databases", status="sleeping") == 1
    # The port is the service's now: nothing else may take it.
    with pytest.raises(OSError):
        socket.create_server(("127.0.0.1", idle["port"]))

    # Five clients at once, the URI as it was: each gets its SELECT 1, no retry.
    assert connect_all(idle["connection_uri"], 5) == [(1,)] * 5
    woken = service.wait_for_status(idle["id"], "ready", timeout=5)
    assert woken["port"] == idle["port"]
    assert kinds(service, idle["id"]).count("woken") == 1
    assert kinds(service, idle["id"])[-2:] == ["slept", "woken"]
    assert metric(service, "dbprov_wakes_total") == 1
    assert metric(service, "dbprov_provisioning_phase_seconds_count", phase="wake") == 1
    assert 0 < woken["phase_timings"]["wake"] < 30
    # Later connections reach the server itself.
    with psycopg.connect(idle["connection_uri"], connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    # Stopped on purpose, it refuses; asleep, a start wakes it as a connection would.
    service.wait_for_status(idle["id"], "sleeping", timeout=15)
    stopped = service.request("POST", f"/databases/{idle['id']}/stop").json()
    assert stopped["status"] in ("stopping", "stopped")
    service.wait_for_status(idle["id"], "stopped", timeout=15)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(idle["connection_uri"], connect_timeout=3)
    assert service.request("POST", f"/databases/{idle['id']}/start").json()["status"] == "ready"
    assert kinds(service, idle["id"])[-1] == "started"


def test_an_idle_database_is_asleep_within_ten_seconds_of_its_last_client(serve, docker_client):
    # The default interval between passes: the idle count runs in them.
    service = serve({"DBPROV_IDLE_STOP": "4", "DBPROV_RECONCILE_INTERVAL": "5"})
    created = service.request("POST", "/databases", json={}).json()
    with psycopg.connect(created["connection_uri"]) as conn:
        conn.execute("SELECT 1")
        time.sleep(6)  # seen by a count while connected
    # Said to sleep once stopped and its port held.
    service.wait_for_status(created["id"], "sleeping", timeout=10)
    assert not running(docker_client, created["id"])


def test_a_client_that_comes_and_goes_between_two_counts_keeps_it_awake(serve):
    service = serve({"DBPROV_IDLE_STOP": "3"})
    created = service.request("POST", "/databases", json={}).json()
    until = time.monotonic() + 9
    while time.monotonic() < until:
        # Never connected when the service looks: a job that connects now and then.
        with psycopg.connect(created["connection_uri"]) as conn:
            conn.execute("SELECT 1")
        time.sleep(1.5)
    assert "slept" not in kinds(service, created["id"])
    assert service.wait_for_status(created["id"], "sleeping", timeout=15)


def test_a_start_during_a_wake_is_the_same_wake(serve):
    service = serve({"DBPROV_IDLE_STOP": "1"})
    created = service.request("POST", "/databases", json={}).json()
    path = f"/databases/{created['id']}"
    # A wake takes a few hundred milliseconds: a start that comes after it
    # finds the database ready (409, nothing to start), and the fall is tried again.
    for _ in range(5):
        service.wait_for_status(created["id"], "sleeping", timeout=15)
        before = kinds(service, created["id"])
        results: list = []
        client = threading.Thread(target=lambda: results.extend(connect_all(created["connection_uri"], 1)))
        client.start()
        # The client's connection is waiting: the start comes during its wake.
        # (A connection that came in the gap after a start let go of the port
        # would be refused: README, "The gap".)
        wait_until(lambda: service.request("GET", path).json()["status"] != "sleeping",
                   timeout=10, what="the wake began")
        response = service.request("POST", f"{path}/start")
        client.join(60)
        assert results == [(1,)]
        events = kinds(service, created["id"])[len(before):]
        if response.status_code == 409 and "ready" in response.json()["detail"] and events[:1] == ["woken"]:
            continue  # it was woken, and ready, before the start came
        assert response.status_code == 200 and response.json()["status"] == "ready"
        assert events.count("woken") == 1 and "started" not in events
        return
    pytest.fail("no start came during a wake in 5 tries")


def test_sleeping_databases_wake_after_the_service_is_killed(serve, docker_client):
    service = serve({"DBPROV_IDLE_STOP": "1"})
    made = [service.request("POST", "/databases", json={}).json() for _ in range(2)]
    for database in made:
        service.wait_for_status(database["id"], "sleeping", timeout=15)
    service.stop(signal.SIGKILL)
    # The ports are free while nothing holds them, then held again by the next service.
    service.start()
    for database in made:
        wait_until(lambda d=database: _held(d["port"]), timeout=15, what="port held again")
        with psycopg.connect(database["connection_uri"], connect_timeout=60) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert service.wait_for_status(database["id"], "ready", timeout=5)["port"] == database["port"]


def test_a_database_that_cannot_wake_tells_its_client_why(serve, docker_client):
    service = serve({"DBPROV_IDLE_STOP": "1"})
    created = service.request("POST", "/databases", json={}).json()
    service.wait_for_status(created["id"], "sleeping", timeout=15)
    wait_until(lambda: not running(docker_client, created["id"]), timeout=10, what="server stopped")
    # Its data removed behind the service's back: no server can start on it.
    for container in docker_client.containers.list(all=True, filters={"label": f"io.dbprov.database-id={created['id']}"}):
        container.remove(force=True, v=True)
    for volume in docker_client.volumes.list(filters={"label": f"io.dbprov.database-id={created['id']}"}):
        volume.remove(force=True)
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(created["connection_uri"], connect_timeout=60)
    assert f"database {created['id']} cannot take connections" in str(refused.value)
    assert "lost" in str(refused.value)
    assert time.monotonic() - started < 30
    assert service.request("GET", f"/databases/{created['id']}").json()["status"] == "lost"
    assert "lost" in kinds(service, created["id"])


def _held(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
