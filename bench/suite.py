"""A pytest suite of N tests, each with a database of its own, run three ways in
the same run, as wall time of the whole `pytest` process:

- dbprov:         the pytest plugin's ``dbprov_database`` against `dbprov serve`
- testcontainers: testcontainers' ``PostgresContainer`` per test
- shared:         one ``PostgresContainer`` for the suite, each test a fresh
                  database in it (CREATE DATABASE / DROP DATABASE)

Each test connects and runs the same small workload. All three use postgres:17
and pytest with plugin autoloading off (so only the plugins named are imported).
The dbprov server is started first and is not counted, as a team's server is
already running; its deletions are drained between variants.

    .venv/bin/python bench/suite.py                 # 50 tests
    .venv/bin/python bench/suite.py --tests 10 --only dbprov shared
    .venv/bin/python bench/suite.py --pool 3        # dbprov with a warm pool of 3

Needs the Docker engine, the postgres:17 image and the `bench` extra
(testcontainers). Not run in CI. Everything it starts carries the label
io.dbprov.instance=bench-suite-<pid> or testcontainers' labels, and is removed
before it exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import docker
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.crypto import generate_key  # noqa: E402
from service.runtime import LABEL_INSTANCE  # noqa: E402

IMAGE = "postgres:17"
INSTANCE = f"bench-suite-{os.getpid()}"
PORT_RANGE = "27432-27631"

WORKLOAD = '''
import psycopg

try:
    from testcontainers.community.postgres import PostgresContainer
except ImportError:  # before testcontainers moved it
    from testcontainers.postgres import PostgresContainer


def work(uri):
    with psycopg.connect(uri, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, str(i)) for i in range(100)])
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (100,)
'''

SUITES = {
    "dbprov": ('''
        import pytest
        from workload import work


        @pytest.mark.parametrize("n", range({tests}))
        def test_it(dbprov_database, n):
            work(dbprov_database.connection_uri)
        ''', ["-p", "dbprov_client.pytest_plugin"]),
    "testcontainers": ('''
        import pytest
        from workload import PostgresContainer, work


        @pytest.fixture
        def database_uri():
            with PostgresContainer("{image}", driver=None) as postgres:
                yield postgres.get_connection_url()


        @pytest.mark.parametrize("n", range({tests}))
        def test_it(database_uri, n):
            work(database_uri)
        ''', []),
    "shared": ('''
        import uuid

        import psycopg
        import pytest
        from workload import PostgresContainer, work


        @pytest.fixture(scope="session")
        def server():
            with PostgresContainer("{image}", driver=None) as postgres:
                yield postgres


        @pytest.fixture
        def database_uri(server):
            name = f"t_{{uuid.uuid4().hex[:12]}}"
            admin = server.get_connection_url()
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {{name}}")
            yield admin.rsplit("/", 1)[0] + "/" + name
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE {{name}} WITH (FORCE)")


        @pytest.mark.parametrize("n", range({tests}))
        def test_it(database_uri, n):
            work(database_uri)
        ''', []),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`dbprov serve --no-auth` on a data folder of its own."""

    def __init__(self, workdir: Path, tests: int, pool: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "dbprov.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBPROV_")}
        env.update(
            DBPROV_DATA_DIR=str(workdir / "data"), DBPROV_INSTANCE=INSTANCE,
            DBPROV_PORT_RANGE=PORT_RANGE, DBPROV_SECRET_KEY=generate_key(),
            DBPROV_IMAGES=f"17={IMAGE}", DBPROV_TENANT_QUOTA=str(tests + pool + 10),
            DBPROV_RATE_LIMIT="100000", DBPROV_RECONCILE_INTERVAL="1",
        )
        if pool:
            env["DBPROV_POOL_SIZE"] = str(pool)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--no-auth"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dbprov serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        if pool:
            self.wait(lambda: self.pool_ready() >= pool, "the warm pool to fill")

    def pool_ready(self) -> int:
        text = requests.get(f"{self.url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("dbprov_pool_servers{") and 'status="ready"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    def live(self) -> int:
        """The suite's databases not yet deleted (not the warm pool's)."""
        items = requests.get(f"{self.url}/databases", params={"page_size": 500}, timeout=10).json()["items"]
        return sum(1 for item in items if item["status"] != "deleted" and item["tenant"] != "_pool")

    def wait(self, predicate, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def run_suite(kind: str, workdir: Path, tests: int, extra: list[str], env: dict[str, str]) -> float:
    folder = workdir / kind
    folder.mkdir()
    source, plugins = SUITES[kind]
    (folder / "workload.py").write_text(WORKLOAD)
    (folder / "test_suite.py").write_text(textwrap.dedent(source).format(tests=tests, image=IMAGE))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugins, *extra]
    started = time.monotonic()
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
        raise SystemExit(f"the {kind} suite failed")
    return elapsed


def cleanup() -> None:
    client = docker.from_env()
    for container in client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={INSTANCE}"}):
        container.remove(force=True)
    for volume in client.volumes.list(filters={"label": f"{LABEL_INSTANCE}={INSTANCE}"}):
        volume.remove(force=True)
    for network in client.networks.list(filters={"label": f"{LABEL_INSTANCE}={INSTANCE}"}):
        network.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=50, help="tests in the suite (default 50)")
    parser.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES))
    parser.add_argument("--pool", type=int, default=0, help="DBPROV_POOL_SIZE of the dbprov server")
    parser.add_argument("--xdist", type=int, default=0, help="run each suite with pytest -n N")
    args = parser.parse_args()
    extra = ["-n", str(args.xdist), "-p", "xdist"] if args.xdist else []

    workdir = Path(tempfile.mkdtemp(prefix="dbprov-suite-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBPROV_")}
    env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", TESTCONTAINERS_RYUK_DISABLED="true")
    server = None
    times: dict[str, float] = {}
    try:
        if "dbprov" in args.only:
            server = Server(workdir, args.tests, args.pool)
            env["DBPROV_URL"] = server.url
        for kind in args.only:
            times[kind] = run_suite(kind, workdir, args.tests, extra, env)
            print(f"{kind}: {times[kind]:.1f} s", file=sys.stderr)
            if kind == "dbprov":
                # Its deletions finish in the server's background: not in the
                # next variant's time.
                server.wait(lambda: server.live() == 0, "the deletions")
    finally:
        if server is not None:
            server.stop()
        cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    base = times.get("shared")
    print(f"\n## {args.tests} tests, each with its own database"
          f"{f' (pytest -n {args.xdist})' if args.xdist else ''}"
          f"{f', dbprov pool {args.pool}' if args.pool else ''}\n")
    print("| variant | wall time (s) | per test (s) | vs shared container |")
    print("|---|---|---|---|")
    for kind, seconds in times.items():
        ratio = f"{seconds / base:.2f}x" if base else "-"
        print(f"| {kind} | {seconds:.1f} | {seconds / args.tests:.3f} | {ratio} |")
    if "dbprov" in times and "testcontainers" in times:
        print(f"\ntestcontainers per test / dbprov: {times['testcontainers'] / times['dbprov']:.2f}x")


if __name__ == "__main__":
    main()
