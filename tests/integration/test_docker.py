"""End to end: the real service, the real engine, real PostgreSQL containers."""

from __future__ import annotations

import io
import re
import signal
import socket
import time

import docker.errors
import psycopg
import pytest

from service.runtime.protocol import labels_for

from .conftest import INSTANCE, ServiceProcess, connected, managed, metric, remove_managed, wait_until

pytestmark = pytest.mark.docker


def create(service, **body) -> dict:
    response = service.request("POST", "/databases", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "ready"
    return created


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As a server binding it would (Go's listeners do): a connection of
        # the test's that the proxy closed may leave the port in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_create_connect_write_read_delete(service, docker_client):
    created = create(service, name="orders")
    with psycopg.connect(created["connection_uri"]) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO item VALUES (1, 'first')")
        conn.commit()
    with psycopg.connect(created["connection_uri"]) as conn:
        assert conn.execute("SELECT label FROM item").fetchall() == [("first",)]

    container = docker_client.containers.get(f"dbprov-{created['id']}")
    binding = container.attrs["HostConfig"]["PortBindings"]["5432/tcp"][0]
    assert binding == {"HostIp": "127.0.0.1", "HostPort": str(created["port"])}
    assert labels_for(INSTANCE, created["id"]).items() <= container.labels.items()
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"

    assert service.request("DELETE", f"/databases/{created['id']}").status_code == 202
    gone = service.wait_for_status(created["id"], "deleted")
    assert gone["port"] is None
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(f"dbprov-{created['id']}")
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(f"dbprov-{created['id']}-data")
    assert port_is_free(created["port"])
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(created["connection_uri"], connect_timeout=2)


@pytest.mark.parametrize("version", ["15", "17"])
def test_each_version_runs_its_own_server(service, version):
    created = create(service, version=version)
    assert created["image"] == f"postgres:{version}"
    with psycopg.connect(created["connection_uri"]) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    assert server_version.split(".")[0] == version


def test_wrong_password_is_refused(service):
    created = create(service)
    uri = created["connection_uri"].replace(created["password"], "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(uri, connect_timeout=5)


def test_restarted_service_still_knows_and_serves_its_databases(service):
    created = create(service)
    with psycopg.connect(created["connection_uri"]) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    service.stop()
    service.start()
    shown = service.request("GET", f"/databases/{created['id']}").json()
    assert shown["status"] == "ready" and shown["port"] == created["port"]
    credentials = service.request("GET", f"/databases/{created['id']}/credentials").json()
    with psycopg.connect(credentials["connection_uri"]) as conn:
        assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)


@pytest.mark.parametrize("mishap", ["killed", "stopped", "removed"])
def test_container_lost_behind_the_service_comes_back_with_its_data(service, docker_client, mishap):
    created = create(service)
    with psycopg.connect(created["connection_uri"]) as conn:
        conn.execute("CREATE TABLE precious AS SELECT 'still here' AS note")
    container = docker_client.containers.get(f"dbprov-{created['id']}")
    if mishap == "killed":
        container.kill()
    elif mishap == "stopped":
        container.stop()
    else:
        container.remove(force=True)
    with connected(created["connection_uri"], what="the database") as conn:
        assert conn.execute("SELECT note FROM precious").fetchone() == ("still here",)
    assert service.wait_for_status(created["id"], "ready")["port"] == created["port"]


def test_orphan_labelled_container_and_volume_are_removed(service, docker_client):
    labels = labels_for(INSTANCE, "0123456789ab")
    volume = docker_client.volumes.create("dbprov-0123456789ab-data", labels=labels)
    orphan = docker_client.containers.create(
        "postgres:17", name="dbprov-0123456789ab", labels=labels,
        environment={"POSTGRES_PASSWORD": "x"},
        volumes={volume.name: {"bind": "/var/lib/postgresql/data", "mode": "rw"}},
    )
    try:
        orphan.start()
    except docker.errors.APIError as exc:
        # The service's sweep (every 0.5 s) may take it between the create and
        # the start: that is the removal this test waits for.
        assert exc.status_code in (404, 409), exc
    wait_until(
        lambda: not managed(docker_client) and not managed(docker_client, "volumes"),
        timeout=30, what="the orphans to be removed",
    )


@pytest.fixture
def broken_image(docker_client):
    """An image whose container fails the way a misconfigured postgres does."""
    dockerfile = (
        "FROM postgres:17\n"
        'ENTRYPOINT ["sh", "-c", "echo \'FATAL: configuration file is broken on purpose\' >&2;'
        ' exit 3"]\n'
    )
    tag = "dbprov-test/broken:latest"
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    yield tag
    docker_client.images.remove(tag, force=True)


def test_container_that_cannot_start_fails_with_its_log(docker_client, broken_image, tmp_path):
    service = ServiceProcess(
        tmp_path, {"DBPROV_IMAGES": f"17=postgres:17,99={broken_image}"}
    ).start()
    try:
        response = service.request("POST", "/databases", json={"version": "99"})
        assert response.status_code == 502, response.text
        assert response.headers["Content-Type"] == "application/problem+json"
        problem = response.json()
        assert "broken on purpose" in problem["detail"]
        failed = service.request("GET", f"/databases/{problem['database_id']}").json()
        assert failed["status"] == "failed" and failed["port"] is None
        # Caught either while it is down or just after the restart policy revived it.
        assert re.search(r"\(exit code 3\)|after \d+ restart", failed["last_error"]), failed
        assert "broken on purpose" in failed["last_error"]
        assert managed(docker_client) == [] and managed(docker_client, "volumes") == []
        service.delete_all()
    finally:
        service.stop()


def test_work_left_by_a_crash_is_finished_by_reconcile_once(service, docker_client):
    # A crash straight after the request was recorded: nothing may be lost.
    response = service.request("POST", "/databases", json={}, headers={"Prefer": "respond-async"})
    assert response.status_code == 202
    created = response.json()
    service.stop(signal.SIGKILL)
    result = service.run("reconcile", "--once")
    assert result.returncode == 0, result.stderr
    service.start()
    ready = service.wait_for_status(created["id"], "ready", timeout=5)
    assert ready["port"] == created["port"]
    with psycopg.connect(created["connection_uri"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    containers = [c for c in managed(docker_client) if c.labels["io.dbprov.database-id"] == created["id"]]
    assert len(containers) == 1


def test_readyz_reports_both_dependencies(service):
    body = service.request("GET", "/readyz").json()
    storage = body.pop("storage")
    assert body == {
        "status": "ok",
        "checks": {"docker": "ok", "metadata": "ok"},
        "images": {"15": "available", "17": "available"},
    }
    # And what the data is kept on, and why (--no-auth: everyone is an admin).
    assert storage["backend"] in ("btrfs", "copy") and storage["reason"]


def test_warm_pool_hands_out_a_running_server_at_once(docker_client, tmp_path):
    service = ServiceProcess(tmp_path, {"DBPROV_POOL_SIZE": "17=1"}).start()
    try:
        deadline = time.monotonic() + 60
        wait_until(
            lambda: metric(service, "dbprov_pool_servers", status="ready", version="17") == 1,
            timeout=60, what="the pool to be stocked",
        )
        warm = {c.name for c in managed(docker_client)}
        created = create(service)
        assert set(created["phase_timings"]) == {"claim"}, created
        assert f"dbprov-{created['id']}" in warm
        with psycopg.connect(created["connection_uri"]) as conn:
            assert conn.execute(
                "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone() == ("app", False)
            conn.execute("CREATE TABLE t (id int)")
        listing = service.request("GET", "/databases").json()
        assert [item["id"] for item in listing["items"]] == [created["id"]]
        # The pool refills with a new server; the claimed one stays the tenant's.
        while len(managed(docker_client)) < 2:
            assert time.monotonic() < deadline + 60, "the pool was not refilled"
            time.sleep(0.3)
        service.delete_all()
    finally:
        service.stop()
    # The pool's own members stay behind by design: the session cleanup removes them.
    assert {c.name for c in managed(docker_client)} != set(), "the refilled member should exist"
    remove_managed(docker_client)


def test_a_warm_server_that_died_is_never_handed_out(docker_client, tmp_path):
    service = ServiceProcess(tmp_path, {"DBPROV_POOL_SIZE": "17=1"}).start()
    try:
        wait_until(
            lambda: metric(service, "dbprov_pool_servers", status="ready", version="17") == 1,
            timeout=60, what="the pool to be stocked",
        )
        # A first claim, so the service follows the engine's events from now on.
        create(service)
        wait_until(
            lambda: metric(service, "dbprov_pool_servers", status="ready", version="17") == 1,
            timeout=60, what="the pool to be refilled",
        )
        mine = {item["id"] for item in service.request("GET", "/databases").json()["items"]}
        (member,) = [c for c in managed(docker_client) if c.name.removeprefix("dbprov-") not in mine]
        member.kill()
        # At once, before a reconcile pass could notice: the create starts a cold server.
        created = create(service)
        assert created["id"] != member.name.removeprefix("dbprov-")
        assert "claim" not in created["phase_timings"], created
        with psycopg.connect(created["connection_uri"]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # The dead member is removed and the pool refilled.
        wait_until(lambda: member.name not in {c.name for c in managed(docker_client)}, timeout=60,
                   what="the dead member to be removed")
        wait_until(
            lambda: metric(service, "dbprov_pool_servers", status="ready", version="17") == 1,
            timeout=60, what="the pool to be refilled",
        )
    finally:
        service.delete_all()
        service.stop()
    remove_managed(docker_client)
