"""dbprov's own image, built here and run against the host's engine, and the compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import psycopg
import pytest
import requests

from .conftest import INSTANCE, PORT_RANGE, ROOT, SECRET_KEY, free_port, managed

# Its module-scoped fixture is made once: the module runs on one xdist worker.
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("test_image")]

SOCKET = "/var/run/docker.sock"


@pytest.fixture(scope="module")
def image(docker_client):
    tag = f"dbprov-test/dbprov:{uuid.uuid4().hex[:8]}"
    # The host network: these machines reach package registries only from it.
    docker_client.images.build(path=str(ROOT), tag=tag, network_mode="host", rm=True)
    yield tag
    docker_client.images.remove(tag, force=True)


def wait_healthy(container, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        container.reload()
        health = container.attrs["State"].get("Health", {}).get("Status")
        if health == "healthy":
            return
        assert container.status == "running", container.logs().decode()
        assert time.monotonic() < deadline, f"not healthy: {health}\n{container.logs().decode()}"
        time.sleep(1)


def test_image_runs_api_and_worker_that_provision_a_reachable_database(
    docker_client, image, postgres_url
):
    api_port = free_port()
    environment = {
        # psycopg and the containers both reach the test server over loopback.
        "DBPROV_DATABASE_URL": postgres_url,
        "DBPROV_INSTANCE": INSTANCE,
        "DBPROV_PORT_RANGE": PORT_RANGE,
        "DBPROV_LISTEN": f"127.0.0.1:{api_port}",
        "DBPROV_WEB_WORKERS": "2",
        "DBPROV_SECRET_KEY": SECRET_KEY,
    }
    common = dict(
        network_mode="host",
        group_add=[str(os.stat(SOCKET).st_gid)],
        volumes={SOCKET: {"bind": SOCKET, "mode": "rw"}},
        environment=environment,
        detach=True,
    )
    worker = docker_client.containers.run(
        image, ["dbprov", "worker"], name=f"dbprov-test-worker-{api_port}",
        healthcheck={"test": ["CMD", "dbprov", "worker", "--check"], "interval": 2_000_000_000},
        **common,
    )
    api = docker_client.containers.run(image, name=f"dbprov-test-api-{api_port}", **common)
    try:
        assert api.attrs["Config"]["User"] == "dbprov"
        wait_healthy(api)
        wait_healthy(worker)
        token = api.exec_run(["dbprov", "tokens", "create", "--tenant", "image"], demux=True)
        assert token.exit_code == 0, token.output
        auth = {"Authorization": f"Bearer {token.output[0].decode().strip()}"}
        url = f"http://127.0.0.1:{api_port}"
        assert requests.get(f"{url}/readyz", timeout=5).json()["checks"] == {
            "docker": "ok", "metadata": "ok"
        }
        response = requests.post(f"{url}/databases", json={}, timeout=120, headers=auth)
        assert response.status_code == 201, response.text
        created = response.json()
        with psycopg.connect(created["connection_uri"], connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app",)
        database_url = f"{url}/databases/{created['id']}"
        assert requests.delete(database_url, timeout=10, headers=auth).status_code == 202
        deadline = time.monotonic() + 60
        while requests.get(database_url, timeout=5, headers=auth).json()["status"] != "deleted":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert managed(docker_client) == [] and managed(docker_client, "volumes") == []
    finally:
        api.stop(timeout=30)
        worker.stop(timeout=30)
        # A clean stop on SIGTERM, not a kill.
        assert api.wait(timeout=10)["StatusCode"] == 0, api.logs().decode()
        assert worker.wait(timeout=10)["StatusCode"] == 0, worker.logs().decode()
        api.remove(v=True)
        worker.remove(v=True)


def test_image_is_small(docker_client, image):
    base = docker_client.images.get("python:3.11-slim").attrs["Size"]
    added = docker_client.images.get(image).attrs["Size"] - base
    # What dbprov adds to its base: the venv with its dependencies.
    assert added < 100 * 1024 * 1024, f"{added / 2**20:.0f} MiB on top of the base image"


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if os.environ.get("CI"):
        pytest.fail("CI must check compose.yaml, but neither docker-compose nor docker compose exists")
    pytest.skip("no docker-compose")


def test_compose_starts_the_deployment(docker_client, image):
    compose = compose_command()
    project = f"dbprovtest{uuid.uuid4().hex[:6]}"
    api_port, metadata_port = free_port(), free_port()
    env = {
        **os.environ,
        "DBPROV_IMAGE": image,
        "DBPROV_METADATA_PASSWORD": uuid.uuid4().hex,
        "DBPROV_METADATA_PORT": str(metadata_port),
        "DBPROV_LISTEN": f"127.0.0.1:{api_port}",
        "DOCKER_GID": str(os.stat(SOCKET).st_gid),
        "DBPROV_INSTANCE": INSTANCE,
        "DBPROV_SECRET_KEY": SECRET_KEY,
    }
    run = lambda *args, **kw: subprocess.run(  # noqa: E731
        [*compose, "-p", project, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, **kw
    )
    assert run("config", "-q").returncode == 0
    try:
        started = run("up", "-d", "--no-build", timeout=300)
        assert started.returncode == 0, started.stderr
        url = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, run("logs").stdout[-4000:]
            time.sleep(1)
        token = run("exec", "-T", "api", "dbprov", "tokens", "create", "--tenant", "compose")
        assert token.returncode == 0, token.stderr
        auth = {"Authorization": f"Bearer {token.stdout.strip()}"}
        response = requests.post(f"{url}/databases", json={}, timeout=120, headers=auth)
        assert response.status_code == 201, response.text
        created = response.json()
        with psycopg.connect(created["connection_uri"], connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        database_url = f"{url}/databases/{created['id']}"
        requests.delete(database_url, timeout=10, headers=auth)
        deadline = time.monotonic() + 60
        while requests.get(database_url, timeout=5, headers=auth).json()["status"] != "deleted":
            assert time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        run("down", "-v", "--timeout", "30", timeout=180)
    assert managed(docker_client) == [] and managed(docker_client, "volumes") == []
