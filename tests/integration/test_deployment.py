"""The deployed topology: gunicorn API workers, separate reconciler workers and a
PostgreSQL metadata store, under concurrent load and metadata outages."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ROOT, ServiceProcess, free_port, managed, wait_until

pytestmark = pytest.mark.docker

GUNICORN = str(Path(sys.executable).parent / "gunicorn")


class Deployment:
    """``gunicorn -c gunicorn.conf.py`` for the API plus ``dbprov worker`` processes."""

    def __init__(self, tmp_path: Path, database_url: str, env: dict[str, str] | None = None,
                 web_workers: int = 4, workers: int = 2) -> None:
        self.api = ServiceProcess(tmp_path, {"DBPROV_DATABASE_URL": database_url, **(env or {})})
        self.web_workers = web_workers
        self.worker_count = workers
        self.workers: list[subprocess.Popen] = []

    def start(self) -> "Deployment":
        assert self.api.run("db", "upgrade").returncode == 0
        self.api.token = self.api.create_token("ops", admin=True)
        for _ in range(self.worker_count):
            with open(self.api.log_path, "a") as log:
                self.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "service", "worker"],
                    env=self.api.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                ))
        self.api.start([
            GUNICORN, "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{self.api.port}",
            "--workers", str(self.web_workers), "service.app:create_app()",
        ])
        return self

    def stop(self) -> None:
        self.api.stop()
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            assert worker.wait(timeout=60) == 0, "a worker did not stop cleanly on SIGTERM"
        self.workers = []


@pytest.fixture
def deployment(docker_client, postgres_url, tmp_path):
    made: list[Deployment] = []

    def make(**kwargs) -> Deployment:
        made.append(Deployment(tmp_path, postgres_url, **kwargs))
        return made[-1].start()

    yield make
    for deployment in made:
        if deployment.api.process is not None:
            deployment.api.delete_all()
        deployment.stop()
    assert managed(docker_client) == [], "containers left behind"
    assert managed(docker_client, "volumes") == [], "volumes left behind"


def test_forty_concurrent_creates_over_four_api_and_two_reconciler_workers(deployment, docker_client):
    api = deployment(env={"DBPROV_READY_TIMEOUT": "180", "DBPROV_REQUEST_TIMEOUT": "240"}).api
    with ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(pool.map(lambda _: api.request("POST", "/databases", json={}), range(40)))
    assert [r.status_code for r in responses] == [201] * 40, [r.text for r in responses if r.status_code != 201]
    created = [r.json() for r in responses]
    assert len({c["port"] for c in created}) == 40
    assert len({c["id"] for c in created}) == 40

    def identity(c: dict) -> tuple:
        with psycopg.connect(c["connection_uri"], connect_timeout=10) as conn:
            return conn.execute("SELECT current_user, inet_server_port()").fetchone()

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(identity, created)) == [("app", 5432)] * 40
    # Each password opens its own database only.
    wrong = created[0]["connection_uri"].replace(created[0]["password"], created[1]["password"])
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(wrong, connect_timeout=5)

    containers = managed(docker_client)
    assert sorted(c.name for c in containers) == sorted(f"dbprov-{c['id']}" for c in created)
    # Each one's data volume (an overlay also has the two it is made of).
    assert len([v for v in managed(docker_client, "volumes") if v.name.endswith("-data")]) == 40
    # Each create is counted once, whichever worker served it and whichever answers the scrape.
    for _ in range(8):
        scraped = text_string_to_metric_families(api.request("GET", "/metrics").text)
        assert sum(
            sample.value for family in scraped for sample in family.samples
            if sample.name == "dbprov_http_request_duration_seconds_count"
            and sample.labels == {"method": "POST", "route": "/databases", "status": "201"}
        ) == 40


def test_racing_for_the_last_free_port_one_wins(deployment):
    api = deployment(env={"DBPROV_PORT_RANGE": "25600-25600"}, workers=1).api
    barrier = threading.Barrier(8)

    def attempt(_):
        barrier.wait()
        return api.request("POST", "/databases", json={}, headers={"Prefer": "respond-async"})

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(attempt, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] + [503] * 7, codes
    for response in responses:
        if response.status_code == 503:
            assert response.json()["type"] == "urn:dbprov:problem:port-range-exhausted"
            assert int(response.headers["Retry-After"]) > 0
    listing = api.request("GET", "/databases").json()
    assert listing["total"] == 1 and listing["items"][0]["port"] == 25600


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_delete_racing_with_provisioning_leaves_nothing(deployment, docker_client, delay):
    api = deployment(workers=2).api
    ids = []
    for _ in range(3):
        response = api.request("POST", "/databases", json={}, headers={"Prefer": "respond-async"})
        assert response.status_code == 202
        ids.append(response.json()["id"])
    time.sleep(delay)
    for database_id in ids:
        assert api.request("DELETE", f"/databases/{database_id}").status_code == 202
    for database_id in ids:
        assert api.wait_for_status(database_id, "deleted")["port"] is None
    wait_until(
        lambda: not managed(docker_client) and not managed(docker_client, "volumes"),
        timeout=30, what="containers and volumes to follow their deleted records",
    )


@pytest.fixture
def metadata_server(docker_client):
    """A PostgreSQL server of its own for the metadata store, created but not started."""
    port = free_port()
    container = docker_client.containers.create(
        "postgres:17", environment={"POSTGRES_PASSWORD": "outage"},
        ports={"5432/tcp": ("127.0.0.1", port)}, name=f"dbprov-test-outage-{port}",
    )
    yield container, f"postgresql+psycopg://postgres:outage@127.0.0.1:{port}/postgres"
    container.remove(force=True, v=True)


def test_service_starts_before_its_metadata_store_and_survives_an_outage(
    docker_client, metadata_server, tmp_path
):
    container, url = metadata_server
    service = ServiceProcess(tmp_path, {"DBPROV_DATABASE_URL": url}).start(ready=False)
    try:
        # Up and answering, but not ready: the store is not there yet.
        readyz = service.request("GET", "/readyz")
        assert readyz.status_code == 503 and "metadata" in readyz.json()["detail"]
        assert service.request("GET", "/healthz").status_code == 200
        assert service.request("GET", "/databases").status_code == 503

        container.start()
        wait_until(lambda: service.request("GET", "/readyz").status_code == 200, what="readyz")
        created = service.request("POST", "/databases", json={}).json()
        assert created["status"] == "ready"

        container.stop()
        outage = service.request("GET", f"/databases/{created['id']}")
        assert outage.status_code == 503
        assert outage.headers["Content-Type"] == "application/problem+json"
        assert outage.json()["type"] == "urn:dbprov:problem:metadata-unavailable"
        assert "Retry-After" in outage.headers
        assert service.request("POST", "/databases", json={}).status_code == 503
        # The tenant's database does not depend on the metadata store.
        with psycopg.connect(created["connection_uri"], connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        container.start()
        wait_until(
            lambda: service.request("GET", f"/databases/{created['id']}").status_code == 200,
            what="recovery",
        )
        assert service.wait_for_status(created["id"], "ready")["port"] == created["port"]
        listing = service.request("GET", "/databases").json()
        assert listing["total"] == 1
        service.delete_all()
    finally:
        service.stop()
    assert managed(docker_client) == [] and managed(docker_client, "volumes") == []
    assert "retrying in" in service.log_path.read_text()


def test_sigterm_stops_a_worker_at_a_step_boundary_and_the_next_one_finishes(
    deployment, docker_client
):
    deployed = deployment(workers=1)
    api = deployed.api
    response = api.request("POST", "/databases", json={}, headers={"Prefer": "respond-async"})
    database_id = response.json()["id"]
    time.sleep(0.3)  # the worker is now somewhere in provisioning
    worker = deployed.workers.pop()
    worker.terminate()
    assert worker.wait(timeout=60) == 0
    with open(api.log_path, "a") as log:
        deployed.workers.append(subprocess.Popen(
            [sys.executable, "-m", "service", "worker"],
            env=api.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        ))
    ready = api.wait_for_status(database_id, "ready")
    with psycopg.connect(response.json()["connection_uri"], connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert [c.name for c in managed(docker_client)] == [f"dbprov-{ready['id']}"]
