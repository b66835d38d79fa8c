"""The API under real gunicorn (gunicorn.conf.py and `dbprov serve`): what the
server hooks start and stop, and /metrics summed over workers. No Docker: only
the metadata store is used."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from service.store.crypto import generate_key
from service.store.engine import CHANNEL

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = str(Path(sys.executable).parent / "gunicorn")


class Server:
    """A command serving the API on a free port, with a fresh data folder."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith("DBPROV_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env = {
            **inherited,
            "DBPROV_DATA_DIR": str(tmp_path / "data"),
            "DBPROV_SECRET_KEY": generate_key(),
            # A reconciler sweeps only containers of its own instance: none here.
            "DBPROV_INSTANCE": f"test-{uuid.uuid4().hex[:8]}",
            # Where gunicorn's master makes its metrics folder.
            "TMPDIR": str(tmp_path),
            **(env or {}),
        }
        self.tmp_path = tmp_path
        self.log = tmp_path / "server.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def dbprov(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "service", *args], env=self.env, cwd=ROOT,
                       check=True, capture_output=True, timeout=60)

    def start(self, command: list[str]) -> "Server":
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def gunicorn(self, workers: int) -> "Server":
        return self.start([GUNICORN, "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}",
                           "--workers", str(workers), "service.app:create_app()"])

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unmatched(families) -> float:
    """Requests counted for paths that match no route."""
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "dbprov_http_request_duration_seconds_count"
        and sample.labels["route"] == "unmatched"
    )


@pytest.fixture
def server(tmp_path):
    made: list[Server] = []

    def make(env: dict[str, str] | None = None) -> Server:
        made.append(Server(tmp_path, env))
        return made[-1]

    yield make
    for server in made:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_the_gunicorn_master_imports_nothing_its_workers_need_fresh():
    code = ("import runpy, sys; runpy.run_path('gunicorn.conf.py'); "
            "print(sorted(m for m in sys.modules if m.startswith(('service.', 'prometheus_client'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    assert loaded.strip() == "['service.web']"


def test_metrics_sum_the_requests_of_every_gunicorn_worker(server):
    api = server()
    api.dbprov("db", "upgrade")
    api.gunicorn(workers=2)
    folder = next(api.tmp_path.glob("dbprov-metrics-*"))

    def per_worker() -> list[float]:
        return [_unmatched(MultiProcessCollector.merge([str(path)]))
                for path in folder.glob("histogram_*.db")]

    def both_answered() -> bool:
        counts = per_worker()
        return len(counts) == 2 and min(counts) > 0

    sent = 0
    # A connection each, until both workers have answered some: each then holds
    # fewer than all, so a scrape that counts them all has summed both.
    while sent < 20 or not both_answered():
        assert sent < 500, f"one worker answered every request: {per_worker()}"
        assert requests.get(f"{api.url}/no-such-path", timeout=5).status_code == 404
        sent += 1
    assert sum(per_worker()) == sent and max(per_worker()) < sent
    for _ in range(10):
        scraped = text_string_to_metric_families(requests.get(f"{api.url}/metrics", timeout=5).text)
        assert _unmatched(scraped) == sent
    assert api.stop() == 0
    assert "Traceback" not in api.log.read_text()
    assert not folder.exists(), "the metrics folder outlived gunicorn"


def test_each_gunicorn_worker_listens_for_changes_until_it_stops(server, postgres_url):
    api = server({"DBPROV_DATABASE_URL": postgres_url})
    api.dbprov("db", "upgrade")
    conninfo = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    database = make_url(postgres_url).database

    def wait_for_listeners(count: int) -> None:
        deadline = time.monotonic() + 20
        while True:
            with psycopg.connect(conninfo) as conn:
                listening = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query = %s",
                    (database, f"LISTEN {CHANNEL}"),
                ).fetchone()[0]
            if listening == count:
                return
            assert time.monotonic() < deadline, f"{listening} listen, not {count}"
            time.sleep(0.2)

    api.gunicorn(workers=2)
    wait_for_listeners(2)
    assert api.stop() == 0
    assert "Traceback" not in api.log.read_text()
    wait_for_listeners(0)


def test_serve_migrates_a_fresh_store_and_reconciles_in_its_one_worker(server):
    api = server()
    api.start([sys.executable, "-m", "service", "serve", "--port", str(api.port), "--no-auth"])
    deadline = time.monotonic() + 20
    while requests.get(f"{api.url}/databases", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, api.log.read_text()
        time.sleep(0.2)
    assert api.stop() == 0
    log = api.log.read_text()
    assert "metadata store is up to date" in log and "reconciler started" in log
    assert log.count("Booting worker") == 1


def _serve_without_authentication(api: Server, *options: str) -> Server:
    api.start([sys.executable, "-m", "service", "serve", "--port", str(api.port), "--no-auth", *options])
    deadline = time.monotonic() + 20
    while requests.get(f"{api.url}/databases", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, api.log.read_text()
        time.sleep(0.2)
    return api


def test_serve_without_authentication_answers_loopback_host_names_only(server):
    api = _serve_without_authentication(server())
    path = f"{api.url}/databases/0123456789ab/credentials"
    # A page whose own host name was made to resolve to 127.0.0.1 (DNS rebinding).
    refused = requests.get(path, headers={"Host": "rebound.example:8080"}, timeout=5)
    assert refused.status_code == 403, refused.text
    assert refused.json()["type"] == "urn:dbprov:problem:loopback-only"
    for host in (f"127.0.0.1:{api.port}", "localhost", "[::1]:9"):
        # Answered: no such database.
        assert requests.get(path, headers={"Host": host}, timeout=5).status_code == 404, host
    assert api.stop() == 0


def test_serve_without_authentication_on_the_ipv6_loopback(server):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    api = server()
    api.url = f"http://[::1]:{api.port}"
    _serve_without_authentication(api, "--host", "::1")
    assert requests.get(f"{api.url}/healthz", timeout=5).status_code == 200
    assert api.stop() == 0
