"""Fixtures for tests against the real Docker engine and real PostgreSQL containers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker
import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from service.runtime.docker import DockerRuntime
from service.runtime.protocol import ABSENT, LABEL_INSTANCE, STOPPED
from service.storage.btrfs import LABEL_SUBVOLUME
from service.storage.pool import open_pool
from service.store.crypto import generate_key

ROOT = Path(__file__).resolve().parents[2]
# Away from the default range, so a dbprov of the user's own is never in the way;
# each xdist worker has a range of its own, so that two workers' services never
# contend for a port (and stay clear of the swarm's 25700-25799).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
PORT_RANGE = f"{25432 + 1000 * _WORKER}-{25531 + 1000 * _WORKER}"
# One label for the whole run: the service under test sweeps only its own.
INSTANCE = f"test-{uuid.uuid4().hex[:8]}"
SECRET_KEY = generate_key()


@pytest.fixture(scope="session")
def docker_client():
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no engine
        if os.environ.get("CI"):
            pytest.fail(f"no Docker engine, and CI must run the Docker tests: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    yield client
    remove_managed(client)
    # The tenant network outlives its databases by design; the test run's goes now.
    for network in client.networks.list(filters={"label": f"{LABEL_INSTANCE}={INSTANCE}"}):
        network.remove()
    # Golden copies belong to no installation: what no server stands on goes,
    # as `dbprov images prune` does it; not while other xdist workers make servers.
    if "PYTEST_XDIST_WORKER" not in os.environ:
        DockerRuntime(
            instance=INSTANCE, network=f"dbprov-{INSTANCE}", bind_address="127.0.0.1", probe_host="127.0.0.1",
            client=client, pool=None if POOL_MISSING else lambda: open_pool(POOL, 64 * 2**30, 2**30),
        ).prune_caches()
    client.close()


# What the btrfs storage pool needs (open_pool says the rest); .ci/run installs
# btrfs-progs, so CI never skips these tests.
POOL_MISSING = (
    "btrfs-progs is not installed" if not (shutil.which("btrfs") and shutil.which("mkfs.btrfs"))
    else "not root: no pool can be mounted" if os.geteuid() != 0
    else None
)
# The pool a service makes by default, which the tests share.
POOL = Path("/var/lib/dbprov/pool")
needs_pool = pytest.mark.skipif(
    POOL_MISSING is not None and not os.environ.get("CI"), reason=f"no storage pool here: {POOL_MISSING}"
)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def connected(uri: str, timeout: float = 60, what: str = "the server") -> psycopg.Connection:
    """A session on ``uri`` once its server takes one (after a start, a kill, a move)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(uri, connect_timeout=2, autocommit=True)
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, f"{what} did not come up"
            time.sleep(0.2)


def metric(service, name: str, **labels: str) -> float:
    """One sample of the service's /metrics, 0 if it has none."""
    for family in text_string_to_metric_families(service.request("GET", "/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def events(service, database_id: str) -> list[dict]:
    response = service.request("GET", f"/databases/{database_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["items"]


def kinds(service, database_id: str) -> list[str]:
    return [event["kind"] for event in events(service, database_id)]


def check_the_data_outlives_its_server(runtime, spec, endpoint, connect, while_stopped=lambda: None) -> None:
    """What every runtime promises of a server whose data holds the table
    ``kept`` (7): a stop keeps the data, a start serves it again, and a
    removal that keeps it leaves it for a server made anew; then it all goes.
    ``connect(endpoint)`` connects once the server answers."""
    database_id = spec.database_id
    runtime.stop_server(database_id)
    stopped = runtime.inspect_server(database_id)
    assert stopped.state == STOPPED and stopped.has_data
    assert {s.database_id: s.state for s in runtime.list_servers()}[database_id] == STOPPED
    while_stopped()
    runtime.start_server(database_id)
    with connect(endpoint) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (7,)

    runtime.remove_server(database_id, keep_data=True)
    absent = runtime.inspect_server(database_id)
    assert absent.state == ABSENT and absent.has_data
    # Made anew on the data it left.
    with connect(runtime.ensure_server(spec)) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (7,)
    runtime.remove_server(database_id)
    assert runtime.inspect_server(database_id) is None
    assert database_id not in {s.database_id for s in runtime.list_servers()}


def remove_managed(docker_client) -> None:
    """Remove the run's containers and volumes, and the pool data each volume
    binds: removed alone, a volume leaves its data in the pool."""
    for container in managed(docker_client):
        container.remove(force=True, v=True)
    for volume in managed(docker_client, "volumes"):
        bound = (volume.attrs.get("Labels") or {}).get(LABEL_SUBVOLUME)
        volume.remove(force=True)
        if bound:
            subprocess.run(["btrfs", "subvolume", "delete", bound], capture_output=True)


def managed(docker_client, kind: str = "containers") -> list:
    filters = {"label": f"{LABEL_INSTANCE}={INSTANCE}"}
    if kind == "containers":
        while True:
            try:
                return docker_client.containers.list(all=True, filters=filters)
            except docker.errors.NotFound:
                pass  # one was removed while the list was read: read it again
    return docker_client.volumes.list(filters=filters)


class ServiceProcess:
    """``dbprov serve`` in a child process, as a user runs it."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "DBPROV_DATA_DIR": str(data_dir),
            "DBPROV_INSTANCE": INSTANCE,
            "DBPROV_PORT_RANGE": PORT_RANGE,
            "DBPROV_READY_TIMEOUT": "30",
            "DBPROV_RECONCILE_INTERVAL": "0.5",
            "DBPROV_IMAGES": "15=postgres:15,17=postgres:17",
            "DBPROV_SECRET_KEY": SECRET_KEY,
            # The load tests make more databases, and faster, than a tenant normally may.
            "DBPROV_TENANT_QUOTA": "100",
            "DBPROV_RATE_LIMIT": "1000",
            **(extra_env or {}),
        }
        self.log_path = data_dir / "service.log"
        # Set for deployments that need authentication: used by request().
        self.token: str | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Another ``dbprov`` command with the same settings."""
        return subprocess.run(
            [sys.executable, "-m", "service", *args],
            env=self.env, cwd=ROOT, capture_output=True, text=True, check=check, timeout=120,
        )

    def start(self, command: list[str] | None = None, ready: bool = True) -> "ServiceProcess":
        """Start ``dbprov serve``, or ``command`` if given, and wait until it answers:
        until /readyz says ready (the store is migrated in the background), or
        with ``ready=False`` only until /healthz answers."""
        command = command or [
            sys.executable, "-m", "service", "serve", "--port", str(self.port), "--no-auth"
        ]
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise AssertionError(f"dbprov serve exited:\n{self.log_path.read_text()}")
            try:
                if requests.get(f"{self.url}/{'readyz' if ready else 'healthz'}", timeout=1).ok:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"dbprov serve did not answer:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM for a clean stop; SIGKILL crashes the whole process group at once."""
        if self.process and self.process.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.send_signal(sig)
            self.process.wait(timeout=60)
        self.process = None

    def create_token(self, tenant: str, admin: bool = False) -> str:
        result = self.run("tokens", "create", "--tenant", tenant, *(["--admin"] if admin else []))
        return result.stdout.strip()

    def request(self, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
        """A request with ``token``, or else the service's own admin token if it has one."""
        token = token or self.token
        headers = {**kwargs.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        return requests.request(method, f"{self.url}{path}", timeout=120, headers=headers, **kwargs)

    def wait_for_status(self, database_id: str, status: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.request("GET", f"/databases/{database_id}").json()
            if body["status"] == status or time.monotonic() > deadline:
                assert body["status"] == status, body
                return body
            time.sleep(0.2)

    def delete_all(self) -> None:
        """Every template, snapshot and database of the service gone, and their data."""
        for template in self.request("GET", "/templates").json()["items"]:
            self.request("DELETE", f"/templates/{template['key']}")
        snapshots = [s["id"] for s in self.request("GET", "/snapshots").json()["items"]]
        for snapshot_id in snapshots:
            self.request("DELETE", f"/snapshots/{snapshot_id}")
        listing = self.request("GET", "/databases", params={"page_size": 500}).json()
        live = [i["id"] for i in listing["items"] if i["status"] != "deleted"]
        for database_id in live:
            # A protected one would refuse; the test that protected it is done with it.
            self.request("PATCH", f"/databases/{database_id}", json={"protected": False})
            self.request("DELETE", f"/databases/{database_id}")
        for database_id in live:
            self.wait_for_status(database_id, "deleted")
        wait_until(
            lambda: not self.request("GET", "/snapshots").json()["items"], timeout=60,
            what="snapshots to be deleted",
        )


@pytest.fixture
def service(request, docker_client, tmp_path):
    """A running service; at the end every database is deleted and nothing is left behind.
    Parametrized indirectly, the parameter is more of its environment."""
    process = ServiceProcess(tmp_path, getattr(request, "param", None)).start()
    yield process
    if process.process is None:
        process.start()
    process.delete_all()
    process.stop()
    assert managed(docker_client) == [], "containers left behind"
    assert managed(docker_client, "volumes") == [], "volumes left behind"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing Docker test shows the logs of its containers and of the service."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or "docker" not in item.keywords:
        return
    try:
        client = docker.from_env()
        for container in managed(client):
            logs = container.logs(tail=50).decode(errors="replace")
            report.sections.append((f"container {container.name} ({container.status})", logs))
    except Exception as exc:  # noqa: BLE001 - the report must not hide the failure
        report.sections.append(("container logs", f"unavailable: {exc}"))
    service = item.funcargs.get("service")
    if service is not None and service.log_path.exists():
        report.sections.append(("dbprov serve log", service.log_path.read_text()[-5000:]))


@pytest.fixture
def serve(docker_client, tmp_path):
    """Starts a service with settings of its own; at the end every database is
    deleted and nothing is left behind, as with the ``service`` fixture."""
    started: list[ServiceProcess] = []

    def start(extra_env: dict[str, str]) -> ServiceProcess:
        process = ServiceProcess(tmp_path, extra_env)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        try:
            process.delete_all()
        finally:
            process.stop()
    assert managed(docker_client) == [], "containers left behind"
    assert managed(docker_client, "volumes") == [], "volumes left behind"
