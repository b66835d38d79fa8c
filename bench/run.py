"""dbprov's benchmarks: one command, one table per benchmark, ratios against a
baseline measured in the same run (these machines are noisy).

    .venv/bin/python bench/run.py                 # everything
    .venv/bin/python bench/run.py ready api       # some: ready burst api density reconcile data
    .venv/bin/python bench/run.py --runs 5 --burst 10 --curve 4 --density 20   # a quick pass

Needs the Docker engine and the postgres:17 image. Every container it starts
carries the label io.dbprov.instance=bench-<pid> (or is removed by name), and
is removed before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.runtime.protocol import LABEL_INSTANCE  # noqa: E402
from service.storage.btrfs import LABEL_SUBVOLUME  # noqa: E402
from service.store.crypto import generate_key  # noqa: E402

IMAGE = "postgres:17"
INSTANCE = f"bench-{os.getpid()}"
INSTANCES: list[str] = []
KEY = generate_key()


# -- helpers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def wait_select1(uri: str, timeout: float = 120) -> None:
    """Poll until SELECT 1 succeeds, as a client that was just handed ``uri`` would."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(uri, connect_timeout=2) as conn:
                conn.execute("SELECT 1").fetchone()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[c if isinstance(c, str) else f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    sys.stdout.flush()


class Service:
    """A dbprov process of the benchmark's own: `dbprov serve`, or gunicorn for the API alone."""

    count = 0

    def __init__(self, env: dict[str, str] | None = None, gunicorn: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dbprov-bench-"))
        self.port = free_port()
        # Each service sweeps containers of its instance that it has no record
        # of: two services at once need an instance (and a port range) each.
        Service.count += 1
        instance = f"{INSTANCE}-{Service.count}"
        INSTANCES.append(instance)
        first = 27000 + 500 * (Service.count % 6)
        self.env = {
            **os.environ,
            "DBPROV_DATA_DIR": str(self.dir),
            "DBPROV_INSTANCE": instance,
            "DBPROV_PORT_RANGE": f"{first}-{first + 499}",
            "DBPROV_IMAGES": f"17={IMAGE}",
            "DBPROV_SECRET_KEY": KEY,
            "DBPROV_TENANT_QUOTA": "1000",
            "DBPROV_RATE_LIMIT": "100000",
            "DBPROV_READY_TIMEOUT": "300",
            "DBPROV_REQUEST_TIMEOUT": "600",
            "DBPROV_LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self.gunicorn = gunicorn
        self.token: str | None = None
        self.process: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "service", *args], env=self.env, cwd=ROOT,
            capture_output=True, text=True, check=True,
        ).stdout.strip()

    def start(self) -> "Service":
        if self.gunicorn:
            command = [
                str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py",
                "--bind", f"127.0.0.1:{self.port}", "--workers", "2", "--access-logfile", "/dev/null",
                "--log-level", "warning", "service.app:create_app()",
            ]
        else:
            command = [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--no-auth"]
        self.log = open(self.dir / "service.log", "w")
        self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                # Ready: the store is migrated (in the background) and the engine answers.
                if self.request("GET", "/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError((self.dir / "service.log").read_text())
            time.sleep(0.1)

    def request(
        self, method: str, path: str, body: dict | None = None, connection=None, token: str | None = None
    ) -> tuple[int, dict]:
        conn = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        headers = {"Content-Type": "application/json"}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        data = response.read()
        if connection is None:
            conn.close()
        is_json = "json" in (response.getheader("Content-Type") or "")
        return response.status, (json.loads(data) if data and is_json else {})

    def delete_all(self, timeout: float = 3600) -> None:
        """Delete every database of this service (all pages, 8 at a time) and wait until none is left deleting."""
        ids, cursor = [], None
        while True:
            _, page = self.request("GET", "/databases?page_size=500" + (f"&cursor={cursor}" if cursor else ""))
            ids += [d["id"] for d in page.get("items", []) if d["status"] != "deleted"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda i: self.request("DELETE", f"/databases/{i}"), ids))
        deadline = time.monotonic() + timeout
        while ids and time.monotonic() < deadline:
            if self.request("GET", "/databases?status=deleting&page_size=1")[1]["total"] == 0:
                return
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.log.close()


def create_many(
    service: Service, count: int, parallel: int, connect: bool = False, body: dict | None = None
) -> list[dict]:
    """``count`` creates, ``parallel`` at a time, each waiting until ready (and connecting)."""

    def one(_):
        status, created = service.request("POST", "/databases", body or {})
        assert status == 201, created
        if connect:
            wait_select1(created["connection_uri"], timeout=900)
        return created

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, range(count)))


def sweep(client: docker.DockerClient) -> None:
    """Remove every container, volume and network this run labelled."""
    for instance in (INSTANCE, *INSTANCES):
        label = {"label": f"{LABEL_INSTANCE}={instance}"}
        for container in client.containers.list(all=True, filters=label):
            container.remove(force=True, v=True)
        for volume in client.volumes.list(filters=label):
            subvolume = (volume.attrs.get("Labels") or {}).get(LABEL_SUBVOLUME)
            volume.remove(force=True)
            if subvolume:
                # Data on a storage pool outlives its volume: it goes too.
                subprocess.run(["btrfs", "subvolume", "delete", subvolume], capture_output=True)
        for network in client.networks.list(filters=label):
            network.remove()


# -- 1. time to ready ---------------------------------------------------------


def floor_once(client: docker.DockerClient, timeout: float = 120, port: int | None = None) -> float:
    port = port or free_port()
    started = time.perf_counter()
    container = client.containers.run(
        IMAGE, detach=True, environment={"POSTGRES_PASSWORD": "bench"},
        ports={"5432/tcp": ("127.0.0.1", port)}, labels={LABEL_INSTANCE: INSTANCE},
    )
    try:
        wait_select1(f"postgresql://postgres:bench@127.0.0.1:{port}/postgres", timeout)
        return time.perf_counter() - started
    finally:
        container.remove(force=True, v=True)


@contextlib.contextmanager
def plain_server(
    client: docker.DockerClient, command: list[str] | None = None
) -> Iterator[tuple[object, str]]:
    """A plain ``docker run`` of the image (with ``command``, if given), answering;
    its container and URI, removed afterwards."""
    port = free_port()
    container = client.containers.run(
        IMAGE, command, detach=True, environment={"POSTGRES_PASSWORD": "bench"},
        ports={"5432/tcp": ("127.0.0.1", port)}, labels={LABEL_INSTANCE: INSTANCE},
    )
    try:
        uri = f"postgresql://postgres:bench@127.0.0.1:{port}/postgres"
        wait_select1(uri)
        yield container, uri
    finally:
        container.remove(force=True, v=True)


def testcontainers_once() -> float | None:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        return None
    # No reaper: its image cannot be pulled here; the container is removed below.
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    started = time.perf_counter()
    container = PostgresContainer(IMAGE, driver=None).with_kwargs(labels={LABEL_INSTANCE: INSTANCE})
    container.start()
    try:
        wait_select1(container.get_connection_url().replace("localhost", "127.0.0.1"))
        return time.perf_counter() - started
    finally:
        container.stop()


def dbprov_once(service: Service) -> tuple[float, bool]:
    started = time.perf_counter()
    status, body = service.request("POST", "/databases", {})
    assert status == 201, body
    wait_select1(body["connection_uri"])
    elapsed = time.perf_counter() - started
    # Like the floor's synchronous removal: the next run starts on an idle machine.
    service.request("DELETE", f"/databases/{body['id']}")
    while service.request("GET", f"/databases/{body['id']}")[1]["status"] != "deleted":
        time.sleep(0.05)
    return elapsed, "claim" in body["phase_timings"]


def wait_for_warm(service: Service, wanted: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        for line in text.splitlines():
            if line.startswith('dbprov_pool_servers{status="ready",version="17"}'):
                if float(line.split()[-1]) >= wanted:
                    return
        time.sleep(0.1)
    raise RuntimeError("the pool was not stocked")


@contextlib.contextmanager
def fresh_postgres_database(url: str) -> Iterator[str]:
    """An empty database on the PostgreSQL server of ``url`` (an SQLAlchemy
    URL), dropped afterwards."""
    name = f"dbprov_bench_{uuid.uuid4().hex[:8]}"
    admin = url.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def bench_ready(client: docker.DockerClient, runs: int) -> None:
    """With DBPROV_BENCH_POSTGRES_URL, the pool also on a PostgreSQL store,
    where the change feed tells the reconciler of each claim."""
    # The paths take turns, run by run, so that the machine's drift (it is
    # shared and noisy) falls on all of them alike.
    with contextlib.ExitStack() as stack:
        paths = {
            "cold": Service(),
            "warm": Service({"DBPROV_POOL_SIZE": "17=3"}),
        }
        if os.environ.get("DBPROV_BENCH_POSTGRES_URL"):
            store = stack.enter_context(fresh_postgres_database(os.environ["DBPROV_BENCH_POSTGRES_URL"]))
            paths["warm-pg"] = Service({"DBPROV_POOL_SIZE": "17=3", "DBPROV_DATABASE_URL": store})
        times: dict[str, list[float]] = {"floor": [], "peer": [], **{path: [] for path in paths}}
        claims = dict.fromkeys(paths, 0)
        try:
            for service in paths.values():
                service.start()
            for path, service in paths.items():
                if path != "cold":
                    wait_for_warm(service, 3)
            for _ in range(runs):
                times["floor"].append(floor_once(client))
                peer = testcontainers_once()
                if peer is not None:
                    times["peer"].append(peer)
                for path, service in paths.items():
                    if path != "cold":
                        wait_for_warm(service, 1)
                    elapsed, claimed = dbprov_once(service)
                    times[path].append(elapsed)
                    claims[path] += claimed
        finally:
            for service in paths.values():
                service.stop()
            sweep(client)
    rows = [
        ["docker run + polling connect (floor)", times["floor"]],
        ["testcontainers PostgresContainer (peer)", times["peer"]],
        ["dbprov, pool off", times["cold"]],
        [f"dbprov, pool on ({claims['warm']}/{runs} from the pool)", times["warm"]],
        [f"dbprov, pool on, PostgreSQL store ({claims.get('warm-pg', 0)}/{runs} from the pool)",
         times.get("warm-pg", [])],
    ]
    base = pct(times["floor"], 50)
    table(
        f"Time to ready: request sent -> first SELECT 1 with the returned URI ({runs} runs each, interleaved)",
        ["path", "p50 s", "p95 s", "p50 / floor", "floor p50 / p50"],
        [[name, pct(t, 50), pct(t, 95), pct(t, 50) / base, base / pct(t, 50)] for name, t in rows if t],
    )


# -- 2. burst -----------------------------------------------------------------


def bench_burst(client: docker.DockerClient, count: int, curve: list[int]) -> None:
    """``count`` creates sent at once, with the service provisioning 1, 2, 4 ...
    at a time (DBPROV_MAX_PARALLEL), against ``count`` simultaneous docker runs."""
    # 100 at once on 2 cores take minutes, the engine's answers too, and each
    # thread needs a connection of its own.
    floor_client = docker.from_env(timeout=900, max_pool_size=count)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=count) as pool:
        # Ports picked up front: ports freed at once could be handed out twice.
        ports: set[int] = set()
        while len(ports) < count:
            ports.add(free_port())
        list(pool.map(lambda port: floor_once(floor_client, timeout=900, port=port), ports))
    floor_wall = time.perf_counter() - started
    floor_client.close()
    rows = [[f"{count} x docker run + polling connect (floor)", floor_wall, count / floor_wall, 1.0]]
    for parallel in curve:
        service = Service({"DBPROV_MAX_PARALLEL": str(parallel)}).start()
        try:
            started = time.perf_counter()
            created = create_many(service, count, count, connect=True)
            wall = time.perf_counter() - started
            # Every one connectable, each on a port of its own.
            ports = {body["port"] for body in created}
            assert len(ports) == count, f"{count - len(ports)} port clashes"
            rows.append([f"dbprov, pool off, DBPROV_MAX_PARALLEL={parallel}", wall, count / wall, wall / floor_wall])
            service.delete_all()
        finally:
            service.stop()
            sweep(client)
    table(
        f"Burst: {count} concurrent creates until all accept connections",
        ["path", "wall s", "databases / s", "wall / floor wall"],
        rows,
    )


# -- 3. API latency -----------------------------------------------------------


def load(
    service: Service, paths: list[str], seconds: float, threads: int, rate: float | None = None,
    token: str | None = None,
) -> tuple[list[float], float]:
    """Latencies and requests per second. With ``rate``, an open loop at that
    many requests per second, each latency counted from when its request was
    due (so a stall is not hidden by the requests it delayed); without, each
    client sends its next request as soon as the last one is answered."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    headers = {"Authorization": f"Bearer {token or service.token}"} if token or service.token else {}

    def worker(offset: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        mine = []
        due = time.perf_counter() + offset
        while time.monotonic() < deadline:
            if rate:
                time.sleep(max(0.0, due - time.perf_counter()))
                started = due
                due += threads / rate
            else:
                started = time.perf_counter()
            conn.request("GET", random.choice(paths), headers=headers)
            response = conn.getresponse()
            # Read whole but not parsed: decoding a page of 50 held the client
            # threads' shared GIL, and the latency is the API's, not the client's.
            response.read()
            mine.append(time.perf_counter() - started)
            assert response.status == 200, response.status
        conn.close()
        with lock:
            latencies.extend(mine)

    pool = [
        threading.Thread(target=worker, args=((i / rate) if rate else 0.0,)) for i in range(threads)
    ]
    started = time.monotonic()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return latencies, len(latencies) / (time.monotonic() - started)


def bench_api(seconds: float, threads: int, rate: float, records: int) -> None:
    """The API alone under gunicorn on ``records`` records (no reconciler: they
    stay as seeded), on SQLite and, with DBPROV_BENCH_POSTGRES_URL, on PostgreSQL."""
    backends = {"SQLite": None}
    if os.environ.get("DBPROV_BENCH_POSTGRES_URL"):
        backends["PostgreSQL"] = os.environ["DBPROV_BENCH_POSTGRES_URL"]
    for backend, url in backends.items():
        env = {"DBPROV_PORT_RANGE": f"30000-{30000 + records + 999}"}
        if url:
            env["DBPROV_DATABASE_URL"] = url
        service = Service(env, gunicorn=True)
        service.cli("db", "upgrade")
        # The tenant's own token, as its clients list their databases; an
        # admin's lists every tenant's.
        service.token = service.cli("tokens", "create", "--tenant", "bench").splitlines()[-1]
        admin = service.cli("tokens", "create", "--tenant", "ops", "--admin").splitlines()[-1]
        subprocess.run(
            [sys.executable, "-c", SEED, str(records)], env=service.env, cwd=ROOT, check=True,
        )
        service.start()
        try:
            _, listing = service.request("GET", "/databases?page_size=500")
            ids = [item["id"] for item in listing["items"]]
            assert listing["total"] == records, listing["total"]
            cursors, cursor = [], None
            for _ in range(20):
                _, page = service.request("GET", "/databases?page_size=50" + (f"&cursor={cursor}" if cursor else ""))
                cursor = page["next_cursor"]
                if cursor is None:
                    break
                cursors.append(cursor)
            rows = []
            for name, paths, token in (
                ("GET /healthz (baseline: no metadata read)", ["/healthz"], None),
                ("GET /databases/{id}", [f"/databases/{i}" for i in ids], None),
                (f"GET /databases (page of 50 of {records:,}, page numbers 1-20)",
                 [f"/databases?page={p}" for p in range(1, 21)], None),
                (f"GET /databases (page of 50 of {records:,}, by cursor)",
                 [f"/databases?cursor={c}" for c in cursors], None),
                ("GET /databases?status=ready (90 % of them)", ["/databases?status=ready"], None),
                ("GET /databases?status=stopped (5 %)", ["/databases?status=stopped"], None),
                ("GET /databases?status=failed (2 %)", ["/databases?status=failed"], None),
                ("GET /databases as an admin (every tenant's)", ["/databases"], admin),
            ):
                steady, _ = load(service, paths, seconds, threads, rate, token)
                _, most = load(service, paths, seconds, threads, token=token)
                rows.append([name, pct(steady, 50) * 1000, pct(steady, 99) * 1000, most])
            # A scrape on its own, as Prometheus makes one every few seconds.
            scrapes, _ = load(service, ["/metrics"], seconds, 1)
            scrape = [pct(scrapes, 50) * 1000, pct(scrapes, 99) * 1000]
        finally:
            service.stop()
            if url:
                subprocess.run([sys.executable, "-c", DROP], env=service.env, cwd=ROOT, check=True)
        base = rows[0][3]
        table(
            f"API latency at a steady {rate:g} requests/s, and the most requests/s with "
            f"{threads} keep-alive clients ({seconds:g} s each; gunicorn 2 workers x 16 threads, {backend})",
            ["request", f"p50 ms @{rate:g}/s", f"p99 ms @{rate:g}/s", "most requests/s", "most / baseline"],
            [row + [row[3] / base] for row in rows],
        )
        print(f"A /metrics scrape on its own ({backend}, one at a time for {seconds:g} s): "
              f"p50 {scrape[0]:.1f} ms, p99 {scrape[1]:.1f} ms.")


# An installation of ``argv[1]`` databases of one tenant, as a busy one has
# them: most ready, one in 20 stopped, one in 50 failed. One is made the usual
# way and the rest are copies of its record (each with its own id and port):
# the API is what is measured, not how they came to be.
SEED = """
import sys
from datetime import timedelta
from sqlalchemy import insert, inspect, select
from service.composition import Services
from service.domain.models import Database, Status, utcnow
from service.domain.tenancy import Principal
count = int(sys.argv[1])
services = Services.build()
services.tenants.set_limit("bench", count + 1)
first = services.databases.create(Principal(tenant="bench"))
with services.store.read() as session:
    record = session.get(Database, first.id)
    template = {c.key: getattr(record, c.key) for c in inspect(Database).column_attrs}
start, end = services.settings.port_range
ports = (port for port in range(start, end + 1) if port != first.host_port)
now = utcnow()
copies = []
for n, port in zip(range(1, count), ports):
    status = Status.FAILED if n % 50 == 0 else Status.STOPPED if n % 20 == 0 else Status.READY
    copies.append({
        **template, "id": f"{n:012x}", "name": f"db-{n}", "status": status,
        "host_port": None if status == Status.FAILED else port,
        "created_at": now - timedelta(seconds=count - n), "ready_at": now,
        "phase_timings": {"server": 0.5, "ready": 0.1, "setup": 0.03, "total": 0.63},
    })
with services.store.transaction() as session:
    session.execute(insert(Database), copies)
if services.store.is_postgres:
    # As a store that grew over time is: its pages marked all-visible and its
    # statistics current (autovacuum would do it within a minute, and its run
    # in the middle of a measurement would be measured instead).
    with services.store.engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
"""

# Leaves the PostgreSQL metadata database as the next run wants it: empty.
DROP = """
from sqlalchemy import text
from service.composition import Services
services = Services.build()
with services.store.engine.begin() as connection:
    connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
"""


# -- 4. density ---------------------------------------------------------------


def container_rss(container) -> int:
    stats = container.stats(stream=False)["memory_stats"]
    detail = stats.get("stats", {})
    # The kernel's page cache is not the server's own memory.
    return stats.get("usage", 0) - detail.get("inactive_file", detail.get("total_inactive_file", 0))


SMALL_PLAN = {"small": {"memory": "256m", "settings": {
    "shared_buffers": "16MB", "max_connections": "20", "max_wal_senders": "0", "autovacuum_max_workers": "1",
}}}


def available_memory() -> int:
    """The host's MemAvailable, in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def bench_density(client: docker.DockerClient, counts: list[int], stopped: int = 50) -> None:
    stopped = min(stopped, counts[-1])
    rows = []
    freed: list[list] = []
    for plan in ("default", "small"):
        for count in counts:
            service = Service({"DBPROV_PLANS": json.dumps(SMALL_PLAN)}).start()
            try:
                created = create_many(service, count, 16, body={"plan": plan})
                # All of them connectable at once, each with its own credentials.
                with ThreadPoolExecutor(max_workers=16) as pool:
                    list(pool.map(lambda body: wait_select1(body["connection_uri"], timeout=60), created))
                time.sleep(10)  # idle: let start-up work settle
                containers = client.containers.list(
                    filters={"label": f"{LABEL_INSTANCE}={service.env['DBPROV_INSTANCE']}"}
                )
                with ThreadPoolExecutor(max_workers=16) as pool:
                    rss = list(pool.map(container_rss, containers))
                rows.append([f"{plan} plan, {len(rss)} idle databases", statistics.mean(rss) / 2**20,
                             pct(rss, 95) / 2**20, sum(rss) / 2**30])
                if count == counts[-1]:
                    freed.append([plan, *stopped_memory(client, service, created[:stopped])])
                service.delete_all()
            finally:
                service.stop()
                sweep(client)
    base = rows[0][1]
    table(
        "Density: memory per idle tenant database (container memory less page cache)",
        ["setup", "mean MiB", "p95 MiB", "total GiB", "mean / default at the first count"],
        [row + [row[1] / base] for row in rows],
    )
    table(
        f"Stopped databases: {stopped} stopped with POST /databases/{{id}}/stop",
        ["plan", "container MiB each, stopped", "host MiB freed each", "freed / idle container MiB"],
        freed,
    )


def stopped_memory(client: docker.DockerClient, service: Service, databases: list[dict]) -> list[float]:
    """A stopped database's container memory (none: it has no processes) and
    what stopping it gave back to the host, per database."""
    containers = {c.name: c for c in client.containers.list(
        filters={"label": f"{LABEL_INSTANCE}={service.env['DBPROV_INSTANCE']}"}
    )}
    idle = [container_rss(containers[f"dbprov-{body['id']}"]) for body in databases]
    before = available_memory()
    for body in databases:
        service.request("POST", f"/databases/{body['id']}/stop", {})
    deadline = time.monotonic() + 300
    while any(service.request("GET", f"/databases/{body['id']}")[1]["status"] != "stopped" for body in databases):
        assert time.monotonic() < deadline, "the databases did not stop"
        time.sleep(0.5)
    time.sleep(5)
    after = available_memory()
    stopped = [container_rss(client.containers.get(f"dbprov-{body['id']}")) for body in databases]
    each = (after - before) / len(databases)
    return [statistics.mean(stopped) / 2**20, each / 2**20, each / statistics.mean(idle)]


# -- 5. reconcile pass --------------------------------------------------------


def bench_reconcile(client: docker.DockerClient, real: int, records: int) -> None:
    from sqlalchemy import insert, inspect, select

    from service.composition import Services
    from service.domain.models import Database
    from service.domain.tenancy import Principal
    from service.runtime.protocol import ServerSpec
    from service.settings import Settings
    from service.store.crypto import Vault
    from service.store.engine import Store
    from tests.fakes import FakePostgres, FakeRuntime

    rows = []
    for count in (0, 1000, records):
        directory = Path(tempfile.mkdtemp(prefix="dbprov-bench-"))
        settings = Settings(
            database_url=f"sqlite:///{directory / 'meta.sqlite3'}", data_dir=directory,
            port_range=(20000, 20000 + count + 999), images={"17": IMAGE}, secret_keys=(KEY,),
            instance=INSTANCE, tenant_quota=count + 1, max_parallel_provisioning=8,
        )
        runtime = FakeRuntime()
        services = Services(settings, Store(settings.database_url), runtime, Vault([KEY]),
                            server_admin=FakePostgres(runtime))
        services.store.upgrade(services.vault)
        reconciler = services.reconciler()
        if count:
            # One database made the usual way, the rest copies of its ready
            # record (each with its own id, name and port) and of its server:
            # the pass is what is measured, not how they came to be.
            first = services.databases.create(Principal(tenant="default"))
            reconciler.run_once(wait=True)
            with services.store.read() as session:
                ready = session.scalars(select(Database).where(Database.id == first.id)).one()
                template = {c.key: getattr(ready, c.key) for c in inspect(Database).column_attrs}
            ports = (port for port in range(*settings.port_range) if port != ready.host_port)
            copies = [
                {**template, "id": f"{n:012x}", "name": None, "host_port": port}
                for n, port in zip(range(1, count), ports)
            ]
            with services.store.transaction() as session:
                session.execute(insert(Database), copies)
            for copy in copies:
                runtime.ensure_server(ServerSpec(copy["id"], IMAGE, {}, copy["host_port"]))
            del copies
        # The fake engine's servers live in this process (a real engine's in
        # dockerd): frozen, so that the collector's walks over them are not
        # counted as the reconciler's.
        gc.collect()
        gc.freeze()
        reconciler.run_once(wait=True)
        passes = []
        for _ in range(10):
            started = time.perf_counter()
            reconciler.run_once(wait=True)
            passes.append(time.perf_counter() - started)
        reconciler.stop()
        gc.unfreeze()
        rows.append([f"{count} ready records, fake runtime", statistics.median(passes) * 1000])

    service = Service().start()
    try:
        create_many(service, real, 16)
        script = (
            "import time, statistics\n"
            "from service.composition import Services\n"
            "s = Services.build(); r = s.reconciler(); r.run_once(wait=True)\n"
            "t = []\n"
            "for _ in range(10):\n"
            "    a = time.perf_counter(); r.run_once(wait=True); t.append(time.perf_counter() - a)\n"
            "print(statistics.median(t))\n"
        )
        service.process.terminate()  # one reconciler per SQLite store: measure with ours alone
        service.process.wait(timeout=60)
        out = subprocess.run([sys.executable, "-c", script], env=service.env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        rows.append([f"{real} ready records, real engine", float(out.split()[-1]) * 1000])
        service.start()
        service.delete_all()
    finally:
        service.stop()
        sweep(client)
    base = rows[0][1]
    table(
        "Reconcile pass (median of 10), SQLite metadata",
        ["records", "ms per pass", "ms / empty pass"],
        [row + [row[1] / base] for row in rows],
    )


# -- 6. data: templates, snapshots, clones ---------------------------------------


def fill(uri: str, megabytes: int) -> None:
    """About ``megabytes`` of table data (rows of 1 KB)."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE filler (id int PRIMARY KEY, payload text)")
        conn.execute(
            "INSERT INTO filler SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, %s) g",
            (megabytes * 1024,),
        )


def make_template(service: Service, key: str, megabytes: int, pool_size: int) -> None:
    status, body = service.request("POST", "/templates", {"key": key})
    assert status == 201, body
    fill(body["database"]["connection_uri"], megabytes)
    status, body = service.request("POST", f"/templates/{key}/finalize", {"pool_size": pool_size})
    assert status == 200, body


def clone_once(service: Service, body: dict) -> tuple[float, dict]:
    """Request sent -> first SELECT 1 on the clone; the clone is deleted afterwards."""
    started = time.perf_counter()
    status, created = service.request("POST", "/databases", body)
    assert status == 201, created
    wait_select1(created["connection_uri"])
    elapsed = time.perf_counter() - started
    service.request("DELETE", f"/databases/{created['id']}")
    return elapsed, created


def bench_data(client: docker.DockerClient, runs: int) -> None:
    """Template clones; snapshots and clones against data size are bench/storage.py's."""
    service = Service().start()
    try:
        make_template(service, "pooled", 10, 2)
        make_template(service, "unpooled", 10, 0)
        times: dict[str, list[float]] = {"floor": [], "pooled": [], "unpooled": []}
        claims = 0
        for _ in range(runs):
            times["floor"].append(floor_once(client))
            wait_for_warm(service, 2)
            elapsed, created = clone_once(service, {"template": "pooled"})
            times["pooled"].append(elapsed)
            claims += "claim" in created["phase_timings"]
            times["unpooled"].append(clone_once(service, {"template": "unpooled"})[0])
        base = pct(times["floor"], 50)
        table(
            f"Template clone (10 MB of data): request sent -> first SELECT 1 ({runs} runs each, interleaved)",
            ["path", "p50 s", "p95 s", "p50 / floor", "floor p50 / p50"],
            [
                [name, pct(t, 50), pct(t, 95), pct(t, 50) / base, base / pct(t, 50)]
                for name, t in (
                    ["docker run + polling connect (floor)", times["floor"]],
                    [f"dbprov template clone, from its pool ({claims}/{runs})", times["pooled"]],
                    ["dbprov template clone, no pool", times["unpooled"]],
                )
            ],
        )
        for key in ("pooled", "unpooled"):
            service.request("DELETE", f"/templates/{key}")
        service.delete_all()
    finally:
        service.stop()
        sweep(client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "only", nargs="*", choices=["ready", "burst", "api", "density", "reconcile", "data", []], default=[]
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--curve", default="1,2,4,8,16", help="DBPROV_MAX_PARALLEL values for the burst")
    parser.add_argument("--density", default="100,300", help="idle databases per density measurement")
    parser.add_argument("--real", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200, help="steady load for the API latency")
    parser.add_argument("--records", type=int, default=10_000, help="records in the store for the API benchmark")
    args = parser.parse_args()
    chosen = set(args.only) or {"ready", "burst", "api", "density", "reconcile", "data"}
    client = docker.from_env()
    print(f"# dbprov benchmarks ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, run {uuid.uuid4().hex[:6]})")
    try:
        if "ready" in chosen:
            bench_ready(client, args.runs)
        if "burst" in chosen:
            bench_burst(client, args.burst, [int(n) for n in args.curve.split(",")])
        if "api" in chosen:
            bench_api(args.seconds, args.threads, args.rate, args.records)
        if "density" in chosen:
            bench_density(client, [int(n) for n in args.density.split(",")])
        if "reconcile" in chosen:
            bench_reconcile(client, args.real, args.records)
        if "data" in chosen:
            bench_data(client, args.runs)
    finally:
        sweep(client)


if __name__ == "__main__":
    main()
