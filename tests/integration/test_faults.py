"""Faults injected into a provisioning on the real engine: the service killed,
the engine restarted, the metadata store stopped, an image missing. Each test
is bounded and ends with every database ready, or failed with a reason, and
nothing orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psycopg
import pytest

from service.storage.golden import LABEL_GOLDEN_OF

from .conftest import ROOT, ServiceProcess, free_port, managed, metric, remove_managed, wait_until

pytestmark = pytest.mark.docker

DOCKER_UP = ROOT.parent / "shared" / "ci" / "docker-up"


def create_async(service, count: int, **body) -> list[str]:
    ids = []
    for _ in range(count):
        response = service.request("POST", "/databases", json=body, headers={"Prefer": "respond-async"})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def settled(service, ids: list[str], timeout: float = 120) -> dict[str, dict]:
    """Wait until every database is ready or failed; failed ones must say why."""
    records: dict[str, dict] = {}

    def done() -> bool:
        for database_id in ids:
            records[database_id] = service.request("GET", f"/databases/{database_id}").json()
        return all(r["status"] in ("ready", "failed") for r in records.values())

    wait_until(done, timeout=timeout, what=f"{ids} to settle")
    for record in records.values():
        if record["status"] == "failed":
            assert record["last_error"] and record["port"] is None, record
    return records


def assert_nothing_orphaned(docker_client, records: dict[str, dict], service) -> None:
    """The engine holds exactly the ready databases, each on its own recorded port."""
    ready = {i: r for i, r in records.items() if r["status"] == "ready"}
    wait_until(
        lambda: {c.labels["io.dbprov.database-id"] for c in managed(docker_client)} == set(ready),
        timeout=30, what="containers to match the ready records",
    )
    wait_until(
        lambda: {v.attrs["Labels"]["io.dbprov.database-id"] for v in managed(docker_client, "volumes")}
        == set(ready),
        timeout=30, what="volumes to match the ready records",
    )
    ports = [r["port"] for r in ready.values()]
    assert len(set(ports)) == len(ports)
    for database_id, record in ready.items():
        container = docker_client.containers.get(f"dbprov-{database_id}")
        assert container.ports["5432/tcp"][0]["HostPort"] == str(record["port"])
        uri = service.request("GET", f"/databases/{database_id}/credentials").json()["connection_uri"]
        # A server the engine restarted may still be recovering.
        wait_until(lambda: answers(uri), timeout=60, what=f"{database_id} to answer")


def answers(uri: str) -> bool:
    try:
        with psycopg.connect(uri, connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_kill_9_at_several_points_of_a_provisioning(service, docker_client):
    ids = []
    # Straight after the record, while the container is made, while it starts
    # and initialises, and about when it becomes ready.
    for delay in (0.0, 0.3, 0.8, 1.6):
        batch = create_async(service, 2)
        ids += batch
        time.sleep(delay)
        service.stop(signal.SIGKILL)
        service.start()
    records = settled(service, ids)
    assert [r["status"] for r in records.values()] == ["ready"] * len(ids), records
    assert_nothing_orphaned(docker_client, records, service)
    assert "Traceback" not in service.log_path.read_text()


def restart_engine() -> None:
    """Stop dockerd as a shutdown would, and start it again as CI's docker-up does."""
    subprocess.run(["pkill", "-TERM", "-x", "dockerd"], check=True)
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.2)
    subprocess.run(["bash", str(DOCKER_UP)], check=True, timeout=120)


@pytest.mark.alone
def test_engine_restarted_in_the_middle_of_a_provisioning(service, docker_client):
    assert os.geteuid() == 0 and DOCKER_UP.exists(), "restarting the engine needs root and docker-up"
    ids = create_async(service, 3)
    restart_engine()
    # The service kept answering from its metadata store throughout.
    assert service.request("GET", "/healthz").status_code == 200
    assert service.request("GET", "/databases").status_code == 200
    records = settled(service, ids, timeout=180)
    assert [r["status"] for r in records.values()] == ["ready"] * 3, records
    assert_nothing_orphaned(docker_client, records, service)
    assert "Traceback" not in service.log_path.read_text()


@pytest.fixture
def metadata_container(docker_client):
    """A PostgreSQL server of its own for the metadata store."""
    port = free_port()
    container = docker_client.containers.run(
        "postgres:17", detach=True, environment={"POSTGRES_PASSWORD": "faults"},
        ports={"5432/tcp": ("127.0.0.1", port)}, name=f"dbprov-test-faults-{port}",
    )
    yield container, f"postgresql+psycopg://postgres:faults@127.0.0.1:{port}/postgres"
    container.remove(force=True, v=True)


def test_metadata_store_stopped_in_the_middle_of_a_provisioning(docker_client, metadata_container, tmp_path):
    container, url = metadata_container
    service = ServiceProcess(tmp_path, {"DBPROV_DATABASE_URL": url}).start()
    try:
        ids = create_async(service, 3)
        time.sleep(0.5)
        container.stop()
        time.sleep(3)
        assert service.request("GET", "/healthz").status_code == 200
        assert service.request("GET", "/databases").status_code == 503
        container.start()
        records = settled(service, ids, timeout=180)
        assert [r["status"] for r in records.values()] == ["ready"] * 3, records
        assert_nothing_orphaned(docker_client, records, service)
        service.delete_all()
    finally:
        service.stop()
    assert managed(docker_client) == [] and managed(docker_client, "volumes") == []
    assert "Traceback" not in service.log_path.read_text()


def test_a_missing_image_is_refused_at_once_and_the_pool_is_unaffected(docker_client, tmp_path):
    service = ServiceProcess(
        tmp_path,
        {"DBPROV_IMAGES": "16=postgres:16,17=postgres:17", "DBPROV_POOL_SIZE": "16=1,17=1"},
    ).start()
    try:
        wait_until(
            lambda: service.request("GET", "/readyz").json()["images"]["16"].startswith("missing"),
            timeout=30, what="the failed pull of postgres:16",
        )
        readyz = service.request("GET", "/readyz").json()
        assert readyz["status"] == "degraded" and readyz["images"]["17"] == "available"
        started = time.monotonic()
        response = service.request("POST", "/databases", json={"version": "16"})
        assert time.monotonic() - started < 2
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["type"] == "urn:dbprov:problem:image-missing"
        assert problem["image"] == "postgres:16" and "postgres:16" in problem["detail"]
        assert service.request("GET", "/databases").json()["total"] == 0
        # The pool stocks version 17 only, and nothing of 16 is ever made.
        wait_until(
            lambda: metric(service, "dbprov_pool_servers", version="17", status="ready") == 1,
            timeout=60, what="the pool of 17",
        )
        time.sleep(1)
        # Its server runs on a golden copy made from postgres:17.
        assert [c.image.labels[LABEL_GOLDEN_OF] for c in managed(docker_client)] == ["postgres:17"]
        assert len([v for v in managed(docker_client, "volumes") if v.name.endswith("-data")]) == 1
    finally:
        service.stop()
    log = service.log_path.read_text()
    assert "Traceback" not in log
    assert log.count("version 16 unavailable") == 1
    # What an operator runs: the state of each image, and a pull that says what failed.
    listed = service.run("images")
    assert listed.stdout.splitlines() == ["16  postgres:16  missing: not pulled", "17  postgres:17  available"]
    pulled = service.run("images", "pull", check=False)
    assert pulled.returncode == 1 and "could not pull postgres:16" in pulled.stderr
    assert "17  postgres:17  available" in pulled.stdout and "Traceback" not in pulled.stderr
    remove_managed(docker_client)
