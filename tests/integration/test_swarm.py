"""Docker Swarm as the runtime (DBPROV_RUNTIME=swarm): the seam method by
method and the whole service, on a single-node swarm these tests make and
leave; placement and the loss of a node on a second node, a Docker engine in
a container, where this machine can run one."""

from __future__ import annotations

import dataclasses
import secrets
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import docker
import docker.errors
import psycopg
import pytest

from service.errors import NodeUnavailable, NotSupported, PortInUse, TransientError
from service.runtime.protocol import ABSENT, LABEL_INSTANCE, RUNNING, UNREACHABLE, ServerSpec
from service.runtime.swarm import SwarmRuntime
from service.runtime.swarm_placement import placement_name
from service.runtime.swarm_services import network_name

from .conftest import (
    INSTANCE,
    ServiceProcess,
    check_the_data_outlives_its_server,
    connected,
    free_port,
    metric,
    wait_until,
)
from .test_deployment import Deployment

pytestmark = [pytest.mark.docker, pytest.mark.alone]

PASSWORD = "swarm-test-password"
# On the node of a swarm these tests made: a run killed before it could leave
# is recognised, taken over and left by the next one.
TEST_SWARM_LABEL = "io.dbprov.test-swarm"
EXCLUDE = "io.dbprov.exclude"
PUBLIC_HOST = "io.dbprov.public-host"
SWARM_ENV = {"DBPROV_RUNTIME": "swarm", "DBPROV_PORT_RANGE": "25700-25799"}
NODE_IMAGE = "dbprov-test-swarm-node:latest"


@pytest.fixture(scope="session")
def swarm(docker_client):
    """This engine as the manager of a single-node swarm, for the session.

    The engine is shared with other test runs: an engine already in a swarm
    that these tests did not make is left alone, and the swarm made here is
    left at the end however the tests ended, so the engine is never left a
    manager.
    """
    info = docker_client.info()["Swarm"]
    if info["LocalNodeState"] == "active":
        node = docker_client.nodes.get(info["NodeID"])
        if TEST_SWARM_LABEL not in (node.attrs["Spec"].get("Labels") or {}):
            pytest.skip("the engine is in a swarm these tests did not make; it is left alone")
    elif info["LocalNodeState"] != "inactive":
        pytest.skip(f"the engine's swarm is {info['LocalNodeState']}")
    had_gwbridge = bool(docker_client.networks.list(names=["docker_gwbridge"]))
    try:
        if info["LocalNodeState"] == "inactive":
            docker_client.swarm.init(advertise_addr="127.0.0.1")
        node_id = docker_client.info()["Swarm"]["NodeID"]
        label_node(docker_client, node_id, {TEST_SWARM_LABEL: "true"})
        yield node_id
    finally:
        try:
            label = f"{LABEL_INSTANCE}={INSTANCE}"
            for service in docker_client.services.list(filters={"label": label}):
                service.remove()
            wait_until(
                lambda: not docker_client.containers.list(
                    all=True, filters={"label": [label, "com.docker.swarm.service.name"]}
                ),
                timeout=60, what="the task containers to go",
            )
        finally:
            docker_client.swarm.leave(force=True)
            if not had_gwbridge:
                for network in docker_client.networks.list(names=["docker_gwbridge"]):
                    try:
                        network.remove()
                    except docker.errors.APIError:
                        pass  # in use by another run's swarm


def label_node(docker_client, node_id: str, labels: dict[str, str | None]) -> None:
    """Set (or, with None, drop) labels of a node."""
    node = docker_client.nodes.get(node_id)
    spec = node.attrs["Spec"]
    merged = {**(spec.get("Labels") or {}), **labels}
    spec["Labels"] = {k: v for k, v in merged.items() if v is not None}
    node.update(spec)


def leftovers(docker_client) -> list[str]:
    """Whatever of this run's Swarm objects and volumes is still there."""
    label = f"{LABEL_INSTANCE}={INSTANCE}"
    found = [f"service {s.name}" for s in docker_client.services.list(filters={"label": label})]
    found += [f"config {c.name}" for c in docker_client.configs.list(filters={"label": label})]
    found += [
        f"network {n.name}"
        for n in docker_client.networks.list(filters={"label": label, "driver": "overlay"})
    ]
    found += [f"volume {v.name}" for v in docker_client.volumes.list(filters={"label": label})]
    found += [
        f"container {c.name}"
        for c in docker_client.containers.list(all=True, filters={"label": label})
        if not c.name.startswith("dbprov-test-swarm-node")
    ]
    return found


def assert_nothing_left(docker_client) -> None:
    # Swarm removes a task's container a moment after its service.
    deadline = time.monotonic() + 30
    while leftovers(docker_client) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert leftovers(docker_client) == [], "left behind"


@pytest.fixture
def runtime(swarm, docker_client):
    runtime = SwarmRuntime(instance=INSTANCE, start_timeout=60, port_grace=2)
    runtime.made = []
    yield runtime
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(runtime.remove_server, runtime.made))
    runtime.client.close()
    assert_nothing_left(docker_client)


def new_server(runtime, **limits) -> tuple[ServerSpec, str]:
    database_id = secrets.token_hex(6)
    runtime.made.append(database_id)
    spec = ServerSpec(
        database_id=database_id, image="postgres:17",
        superuser="admin", superuser_password=PASSWORD, extra_environment={"POSTGRES_DB": "postgres"},
        port=free_port(), **limits,
    )
    return spec, database_id


def connect_when_up(endpoint, timeout: float = 60) -> psycopg.Connection:
    return connected(f"postgresql://admin:{PASSWORD}@{endpoint.host}:{endpoint.port}/postgres", timeout,
                     what=f"the server at {endpoint}")


def task_container(docker_client, database_id: str):
    running = docker_client.containers.list(
        filters={"label": f"com.docker.swarm.service.name=dbprov-{database_id}"}
    )
    assert len(running) == 1
    return running[0]


# -- the seam ---------------------------------------------------------------------


def test_a_server_lives_stops_starts_and_goes_with_all_it_made(runtime, docker_client, swarm):
    spec, database_id = new_server(runtime, memory_limit="256m", cpus=0.5, pids_limit=256)
    endpoint = runtime.ensure_server(spec)
    # The manager advertises 127.0.0.1: its address is where the server answers.
    assert endpoint.host == "127.0.0.1" and endpoint.port == spec.port
    assert runtime.endpoint(database_id) == endpoint
    with connect_when_up(endpoint) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 7 AS n")

    service = docker_client.services.get(f"dbprov-{database_id}").attrs
    template = service["Spec"]["TaskTemplate"]
    assert service["Spec"]["Mode"] == {"Replicated": {"Replicas": 1}}
    assert template["Placement"]["Constraints"] == [f"node.id=={swarm}"]
    assert template["RestartPolicy"]["Condition"] == "any"
    assert template["Resources"]["Limits"] == {
        "MemoryBytes": 256 * 2**20, "NanoCPUs": 500_000_000, "Pids": 256,
    }
    assert service["Spec"]["EndpointSpec"]["Ports"] == [{
        "Protocol": "tcp", "TargetPort": 5432, "PublishedPort": spec.port, "PublishMode": "host",
    }]
    network = docker_client.networks.get(network_name(database_id), scope="swarm").attrs
    assert network["Driver"] == "overlay" and network["Attachable"]
    assert template["Networks"] == [{"Target": network["Id"]}]
    container = task_container(docker_client, database_id).attrs
    # Alone on its own network; its published port goes through docker_gwbridge,
    # which Swarm makes without traffic between containers.
    assert list(container["NetworkSettings"]["Networks"]) == [network_name(database_id)]
    gwbridge = docker_client.networks.get("docker_gwbridge").attrs
    assert gwbridge["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert container["HostConfig"]["Memory"] == 256 * 2**20
    assert container["HostConfig"]["NanoCpus"] == 500_000_000
    assert container["HostConfig"]["PidsLimit"] == 256
    # Engines before API 1.46 drop NoNewPrivileges from a service; the runtime says which.
    enforced = any("no-new-privileges" in o for o in container["HostConfig"]["SecurityOpt"] or [])
    assert runtime.no_new_privileges is not None and enforced == runtime.no_new_privileges

    assert runtime.ensure_server(spec) == endpoint  # repeating it changes nothing
    assert docker_client.services.get(f"dbprov-{database_id}").id == service["ID"]
    assert runtime.inspect_server(database_id).state == RUNNING
    assert "database system is ready" in runtime.server_logs(database_id)

    def no_task_runs() -> None:
        assert not docker_client.containers.list(
            filters={"label": f"com.docker.swarm.service.name=dbprov-{database_id}"}
        )

    # Made anew, the server lands on the node its placement names.
    check_the_data_outlives_its_server(runtime, spec, endpoint, connect_when_up, while_stopped=no_task_runs)
    assert_nothing_left(docker_client)


def test_a_server_cannot_reach_another(runtime, docker_client):
    first, first_id = new_server(runtime)
    second, second_id = new_server(runtime)
    connect_when_up(runtime.ensure_server(first)).close()
    connect_when_up(runtime.ensure_server(second)).close()
    networks = task_container(docker_client, second_id).attrs["NetworkSettings"]["Networks"]
    own = networks[network_name(second_id)]["IPAddress"]
    gwbridge = docker_client.networks.get("docker_gwbridge").attrs["Containers"]
    bridged = [
        c["IPv4Address"].split("/")[0] for cid, c in gwbridge.items()
        if cid == task_container(docker_client, second_id).id
    ]
    assert own and bridged
    source = task_container(docker_client, first_id)
    for address in (own, *bridged):
        # pg_isready: 0 accepting, 1 rejecting, 2 no response.
        probe = source.exec_run(["pg_isready", "-h", address, "-p", "5432", "-t", "3"])
        assert probe.exit_code == 2, (address, probe.output)
    # While its own port answers from inside.
    assert source.exec_run(["pg_isready", "-h", "127.0.0.1", "-t", "3"]).exit_code == 0


def test_jobs_run_beside_the_server_and_copies_make_independent_servers(runtime, tmp_path):
    source, source_id = new_server(runtime)
    endpoint = runtime.ensure_server(source)
    with connect_when_up(endpoint) as conn:
        conn.execute("CREATE TABLE origin AS SELECT 'source' AS side")
    result = runtime.run_job(source_id, ["sh", "-c", "cat /var/lib/postgresql/data/PG_VERSION"])
    assert result.exit_code == 0 and result.output.strip() == "17"
    failing = runtime.run_job(source_id, ["sh", "-c", "echo no such thing >&2; exit 4"])
    assert failing.exit_code == 4 and "no such thing" in failing.output
    # In the server's network namespace, with a file put in.
    (tmp_path / "query.sql").write_text("SELECT 40 + 2;\n")
    beside = runtime.run_job(
        source_id, ["psql", "-h", "127.0.0.1", "-U", "admin", "-d", "postgres", "-tA", "-f", "/tmp/input"],
        {"PGPASSWORD": PASSWORD}, input_file=tmp_path / "query.sql",
    )
    assert beside.exit_code == 0 and beside.output.strip() == "42", beside.output
    streamed = b"".join(runtime.stream_job(
        source_id,
        ["psql", "-h", "127.0.0.1", "-U", "admin", "-d", "postgres", "-tAc", "SELECT side FROM origin"],
        {"PGPASSWORD": PASSWORD},
    ))
    assert streamed.strip() == b"source"

    runtime.stop_server(source_id)  # a consistent copy
    target, target_id = new_server(runtime)
    assert runtime.copy_data(source_id, target_id, "postgres:17") > 1_000_000
    runtime.start_server(source_id)
    with connect_when_up(runtime.ensure_server(target)) as conn:
        assert conn.execute("SELECT side FROM origin").fetchone() == ("source",)
        conn.execute("INSERT INTO origin VALUES ('clone')")
    with connect_when_up(endpoint) as conn:
        assert conn.execute("SELECT side FROM origin").fetchall() == [("source",)]


def test_a_taken_port_is_reported_and_only_the_data_is_left(runtime):
    spec, database_id = new_server(runtime)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", spec.port))
        holder.listen()
        with pytest.raises(PortInUse, match=str(spec.port)):
            runtime.ensure_server(spec)
    info = runtime.inspect_server(database_id)
    assert info.state == ABSENT and info.has_data
    # What the reconciler does next: another port.
    moved = dataclasses.replace(spec, port=free_port())
    connect_when_up(runtime.ensure_server(moved)).close()


def test_a_service_and_network_removed_behind_its_back_come_back_on_the_data(runtime, docker_client):
    spec, database_id = new_server(runtime)
    with connect_when_up(runtime.ensure_server(spec)) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 1 AS n")
    docker_client.services.get(f"dbprov-{database_id}").remove()
    wait_until(
        lambda: runtime.inspect_server(database_id).state == ABSENT, timeout=30, what="the server to go"
    )
    docker_client.networks.get(network_name(database_id), scope="swarm").remove()
    assert docker_client.configs.get(placement_name(database_id))  # where the data is stays known
    with connect_when_up(runtime.ensure_server(spec)) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (1,)


# -- the whole service --------------------------------------------------------------


@pytest.fixture
def swarm_service(swarm, docker_client, tmp_path):
    """``dbprov serve`` with DBPROV_RUNTIME=swarm; at the end everything it made is gone."""
    process = ServiceProcess(tmp_path, SWARM_ENV).start()
    yield process
    if process.process is None:
        process.start()
    process.delete_all()
    process.stop()
    assert_nothing_left(docker_client)


def test_create_connect_write_read_delete(swarm_service, docker_client):
    created = swarm_service.request("POST", "/databases", json={}).json()
    assert created["status"] == "ready", created
    with psycopg.connect(created["connection_uri"], connect_timeout=10) as conn:
        conn.execute("CREATE TABLE notes (body text)")
        conn.execute("INSERT INTO notes VALUES ('on a swarm')")
    with psycopg.connect(created["connection_uri"], connect_timeout=10) as conn:
        assert conn.execute("SELECT body FROM notes").fetchone() == ("on a swarm",)
    service = docker_client.services.get(f"dbprov-{created['id']}")
    assert service.attrs["Spec"]["Labels"][LABEL_INSTANCE] == INSTANCE
    logs = swarm_service.request("GET", f"/databases/{created['id']}/logs")
    assert logs.status_code == 200 and "ready to accept connections" in logs.text

    assert swarm_service.request("DELETE", f"/databases/{created['id']}").status_code == 202
    assert swarm_service.wait_for_status(created["id"], "deleted")["port"] is None
    assert_nothing_left(docker_client)


def test_a_service_removed_behind_its_back_is_made_again_on_its_data(swarm_service, docker_client):
    created = swarm_service.request("POST", "/databases", json={}).json()
    with psycopg.connect(created["connection_uri"], connect_timeout=10) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 'before' AS n")
    old = docker_client.services.get(f"dbprov-{created['id']}")
    old.remove()

    def back() -> bool:
        try:
            again = docker_client.services.get(f"dbprov-{created['id']}")
        except docker.errors.NotFound:
            return False
        return again.id != old.id

    wait_until(back, timeout=60, what="the service to be made again")
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(created["connection_uri"], connect_timeout=5) as conn:
                assert conn.execute("SELECT n FROM kept").fetchone() == ("before",)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    assert swarm_service.wait_for_status(created["id"], "ready")["port"] == created["port"]


def test_orphans_are_swept(swarm_service, docker_client):
    # Made while the service is down: a server no record owns.
    swarm_service.stop()
    orphans = SwarmRuntime(instance=INSTANCE)
    spec = ServerSpec(secrets.token_hex(6), "postgres:17", "postgres", PASSWORD, port=free_port())
    orphans.ensure_server(spec)
    swarm_service.start()
    wait_until(
        lambda: orphans.inspect_server(spec.database_id) is None, timeout=60,
        what="the orphan's service, network, placement and volume to be swept",
    )
    orphans.client.close()


def test_stop_and_start_keep_the_data(swarm_service, docker_client):
    created = swarm_service.request("POST", "/databases", json={}).json()
    with psycopg.connect(created["connection_uri"], connect_timeout=10) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 3 AS n")
    assert swarm_service.request("POST", f"/databases/{created['id']}/stop").status_code == 202
    swarm_service.wait_for_status(created["id"], "stopped")
    service = docker_client.services.get(f"dbprov-{created['id']}")
    assert service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    started = swarm_service.request("POST", f"/databases/{created['id']}/start")
    assert started.status_code == 200 and started.json()["status"] == "ready", started.text
    with psycopg.connect(created["connection_uri"], connect_timeout=10) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (3,)


def test_a_server_verifies_with_the_services_ca_at_its_nodes_host(swarm_service, docker_client, swarm, tmp_path):
    # A name for the node that no server's certificate has otherwise: 127.0.0.2
    # reaches the host-mode port too.
    label_node(docker_client, swarm, {PUBLIC_HOST: "127.0.0.2"})
    try:
        created = swarm_service.request("POST", "/databases", json={}).json()
    finally:
        label_node(docker_client, swarm, {PUBLIC_HOST: None})
    assert created["host"] == "127.0.0.2" and created["connection_uri"].endswith("?sslmode=require"), created
    root = tmp_path / "ca.pem"
    root.write_text(swarm_service.request("GET", "/ca.pem").text)
    with psycopg.connect(
        created["connection_uri"], sslmode="verify-full", sslrootcert=str(root), connect_timeout=10
    ) as conn:
        assert conn.pgconn.ssl_in_use


def test_snapshots_clones_dumps_and_restores(swarm_service, docker_client):
    source = swarm_service.request("POST", "/databases", json={}).json()
    with psycopg.connect(source["connection_uri"], connect_timeout=10) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
        conn.execute("INSERT INTO item SELECT generate_series(1, 100)")
    snapshot = swarm_service.request("POST", f"/databases/{source['id']}/snapshots")
    assert snapshot.status_code == 201 and snapshot.json()["status"] == "ready", snapshot.text
    # The snapshot's data is placed on its database's node, and so is a clone.
    assert docker_client.configs.get(placement_name(snapshot.json()["id"]))
    clone = swarm_service.request("POST", "/databases", json={"from_snapshot": snapshot.json()["id"]})
    assert clone.status_code == 201, clone.text
    with psycopg.connect(clone.json()["connection_uri"], connect_timeout=10) as conn:
        assert conn.execute("SELECT count(*) FROM item").fetchone() == (100,)
        conn.execute("DELETE FROM item")
    with psycopg.connect(source["connection_uri"], connect_timeout=10) as conn:
        assert conn.execute("SELECT count(*) FROM item").fetchone() == (100,)

    dump = swarm_service.request("GET", f"/databases/{source['id']}/dump", stream=True)
    assert dump.status_code == 200, dump.text
    archive = b"".join(dump.iter_content(65536))
    assert archive.startswith(b"PGDMP")
    target = swarm_service.request("POST", "/databases", json={}).json()
    restored = swarm_service.request(
        "POST", f"/databases/{target['id']}/restore", data=archive,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert restored.status_code == 200, restored.text
    with psycopg.connect(target["connection_uri"], connect_timeout=10) as conn:
        assert conn.execute("SELECT count(*) FROM item").fetchone() == (100,)
    dropped = swarm_service.request("DELETE", f"/snapshots/{snapshot.json()['id']}")
    assert dropped.status_code in (200, 202, 204), dropped.text


def test_the_warm_pool_hands_out_a_running_server(swarm, docker_client, tmp_path):
    service = ServiceProcess(tmp_path, {**SWARM_ENV, "DBPROV_POOL_SIZE": "17=1"}).start()
    sweeper = SwarmRuntime(instance=INSTANCE)
    try:
        wait_until(
            lambda: metric(service, "dbprov_pool_servers", status="ready", version="17") == 1,
            timeout=60, what="the pool to be stocked",
        )
        label = f"{LABEL_INSTANCE}={INSTANCE}"
        warm = {s.name for s in docker_client.services.list(filters={"label": label})}
        created = service.request("POST", "/databases", json={}).json()
        assert set(created["phase_timings"]) == {"claim"}, created
        assert f"dbprov-{created['id']}" in warm
        with psycopg.connect(created["connection_uri"], connect_timeout=10) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app",)
        service.delete_all()
    finally:
        service.stop()
        # The pool's members outlive the service by design.
        for info in sweeper.list_servers():
            sweeper.remove_server(info.database_id)
        sweeper.client.close()
    assert_nothing_left(docker_client)


def test_two_workers_on_postgresql_metadata(swarm, docker_client, postgres_url, tmp_path):
    deployment = Deployment(tmp_path, postgres_url, env=SWARM_ENV, web_workers=2, workers=2).start()
    try:
        api = deployment.api
        with ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(pool.map(lambda _: api.request("POST", "/databases", json={}), range(6)))
        assert [r.status_code for r in responses] == [201] * 6, [r.text for r in responses]
        created = [r.json() for r in responses]
        assert len({c["port"] for c in created}) == 6

        def identity(c: dict) -> tuple:
            with psycopg.connect(c["connection_uri"], connect_timeout=10) as conn:
                return conn.execute("SELECT current_user, inet_server_port()").fetchone()

        with ThreadPoolExecutor(max_workers=6) as pool:
            assert list(pool.map(identity, created)) == [("app", 5432)] * 6
        services = docker_client.services.list(filters={"label": f"{LABEL_INSTANCE}={INSTANCE}"})
        assert sorted(s.name for s in services) == sorted(f"dbprov-{c['id']}" for c in created)
        api.delete_all()
    finally:
        if deployment.api.process is not None:
            deployment.api.delete_all()
        deployment.stop()
    assert_nothing_left(docker_client)


# -- a second node ---------------------------------------------------------------------

# An extra swarm node: Debian's dockerd in a container. Not --privileged:
# where the engine itself lacks a capability (this kind of machine has no
# CAP_SYS_RESOURCE), --privileged asks for it and the container cannot start;
# every other capability, no seccomp or AppArmor profile, and the cgroup
# hierarchies made writable by the entry script do what it would.
NODE_DOCKERFILE = """\
FROM python:3.11-slim
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
      docker.io iptables procps socat > /dev/null \\
 && rm -rf /var/lib/apt/lists/*
COPY entry.sh /usr/local/bin/entry.sh
VOLUME /var/lib/docker
ENTRYPOINT ["/bin/sh", "/usr/local/bin/entry.sh"]
"""
NODE_ENTRY = """\
#!/bin/sh
set -e
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    # cgroup v2: writable, and the controllers handed down to dockerd's children.
    mount -o remount,rw /sys/fs/cgroup 2>/dev/null || true
    mkdir -p /sys/fs/cgroup/init
    xargs -rn1 < /sys/fs/cgroup/cgroup.procs > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || true
    sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers \\
        > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
else
    for d in /sys/fs/cgroup/*; do mount -o remount,bind,rw "$d" 2>/dev/null || true; done
fi
# The manager advertises 127.0.0.1:2377: this node's own 127.0.0.1 must lead to it.
socat TCP-LISTEN:2377,bind=127.0.0.1,fork,reuseaddr "TCP:${MANAGER_ADDR}:2377" &
exec dockerd --storage-driver "${STORAGE_DRIVER:-overlay2}" --host unix:///var/run/docker.sock
"""


class SecondNode:
    """A Docker engine in a container, joined to the test swarm as a worker."""

    def __init__(self, docker_client, container) -> None:
        self.client = docker_client
        self.container = container
        self.id = ""

    def docker(self, *args: str, check: bool = True) -> str:
        result = self.container.exec_run(["docker", *args])
        output = result.output.decode(errors="replace")
        assert not check or result.exit_code == 0, output
        return output

    @property
    def address(self) -> str:
        self.container.reload()
        return self.container.attrs["NetworkSettings"]["IPAddress"]

    def state(self) -> str:
        return self.client.nodes.get(self.id).attrs["Status"]["State"]

    def volumes(self) -> str:
        return self.docker("volume", "ls", "-q")


@pytest.fixture(scope="module")
def second_node(swarm, docker_client, tmp_path_factory):
    """A second swarm node on this machine, or a skip that says why there is none."""
    context = tmp_path_factory.mktemp("swarm-node")
    (context / "Dockerfile").write_text(NODE_DOCKERFILE)
    (context / "entry.sh").write_text(NODE_ENTRY)
    try:
        docker_client.images.build(path=str(context), tag=NODE_IMAGE, network_mode="host", rm=True)
    except (docker.errors.BuildError, docker.errors.APIError) as exc:
        pytest.skip(f"cannot build the node image (Debian's docker.io over apt): {exc}")
    gateway = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
    host_config = docker_client.api.create_host_config(
        cap_add=["ALL"], cap_drop=["SYS_RESOURCE"],
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
    )
    # What `--security-opt systempaths=unconfined` does: /proc/sys writable, for dockerd's sysctls.
    host_config.update(MaskedPaths=[], ReadonlyPaths=[])
    created = docker_client.api.create_container(
        NODE_IMAGE, name=f"dbprov-test-swarm-node-{INSTANCE}", labels={LABEL_INSTANCE: INSTANCE},
        environment={"MANAGER_ADDR": gateway}, host_config=host_config,
    )
    container = docker_client.containers.get(created["Id"])
    container.start()
    node = SecondNode(docker_client, container)
    try:
        try:
            wait_until(lambda: node.docker("info", check=False).count("Server Version") == 1, timeout=30,
                       what="the node's engine")
        except AssertionError:
            logs = container.logs(tail=20).decode(errors="replace")
            pytest.skip(f"the node's engine did not start:\n{logs}")
        # Nothing can be pulled here: the node gets the images from this engine.
        for image in ("postgres:17", "python:3.11-slim"):
            subprocess.run(
                f"docker save {image} | docker exec -i {container.name} docker load",
                shell=True, check=True, capture_output=True, timeout=300,
            )
        probe = node.container.exec_run(
            ["docker", "run", "--rm", "--entrypoint", "true", "postgres:17"]
        )
        if probe.exit_code != 0:
            pytest.skip(f"the node's engine cannot run containers: {probe.output.decode(errors='replace')}")
        token = docker_client.swarm.attrs["JoinTokens"]["Worker"]
        node.docker("swarm", "join", "--token", token, "--advertise-addr", node.address, "127.0.0.1:2377")
        node.id = node.docker("info", "--format", "{{.Swarm.NodeID}}").strip()
        wait_until(lambda: node.state() == "ready", timeout=60, what="the node to be ready")
        yield node
    finally:
        container.remove(force=True, v=True)
        if node.id:
            try:
                docker_client.nodes.get(node.id)  # still listed: drop it
                subprocess.run(["docker", "node", "rm", "--force", node.id], capture_output=True, timeout=60)
            except docker.errors.NotFound:
                pass


@pytest.fixture
def manager_excluded(swarm, docker_client):
    """New databases go to the second node only."""
    label_node(docker_client, swarm, {EXCLUDE: "true"})
    yield
    label_node(docker_client, swarm, {EXCLUDE: None})


def test_placement_follows_labels_and_capacity(
    runtime, second_node, docker_client, swarm, manager_excluded, tmp_path
):
    spec, database_id = new_server(runtime)
    endpoint = runtime.ensure_server(spec)
    assert endpoint.host == second_node.address  # the node's address, reachable from here
    with connect_when_up(endpoint) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 'remote' AS n")
    assert f"dbprov-{database_id}-data" in second_node.volumes()
    assert f"dbprov-{database_id}-data" not in {v.name for v in docker_client.volumes.list()}

    # Jobs on another node: a one-off service on the data, on the server's network.
    version = runtime.run_job(database_id, ["sh", "-c", "cat /var/lib/postgresql/data/PG_VERSION"])
    assert version.exit_code == 0 and version.output.strip() == "17", version.output
    query = runtime.run_job(
        database_id, ["psql", "-U", "admin", "-d", "postgres", "-tAc", "SELECT n FROM kept"],
        {"PGPASSWORD": PASSWORD},
    )
    assert query.exit_code == 0 and query.output.strip() == "remote", query.output
    (tmp_path / "input").write_text("SELECT 1;")
    with pytest.raises(NotSupported, match="input file"):
        runtime.run_job(database_id, ["true"], input_file=tmp_path / "input")
    with pytest.raises(NotSupported, match="streaming"):
        next(iter(runtime.stream_job(database_id, ["true"])))

    # A copy stays on its source's node, and so does its server.
    runtime.stop_server(database_id)
    copy, copy_id = new_server(runtime)
    runtime.copy_data(database_id, copy_id, "postgres:17")
    runtime.start_server(database_id)
    with connect_when_up(runtime.ensure_server(copy)) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == ("remote",)
    assert runtime.endpoint(copy_id).host == second_node.address

    # The operator's public name for the node.
    label_node(docker_client, second_node.id, {PUBLIC_HOST: "db-2.example.test"})
    try:
        assert runtime.endpoint(database_id).host == "db-2.example.test"
    finally:
        label_node(docker_client, second_node.id, {PUBLIC_HOST: None})

    # Capacity: the emptier node first; a node over its count or memory takes none.
    label_node(docker_client, swarm, {EXCLUDE: None})
    local, local_id = new_server(runtime)
    assert runtime.ensure_server(local).host == "127.0.0.1"
    crowded = SwarmRuntime(instance=INSTANCE, max_per_node=1)
    with pytest.raises(TransientError, match="DBPROV_SWARM_MAX_PER_NODE"):
        crowded.ensure_server(new_server(runtime)[0])
    crowded.client.close()
    huge = max(n.memory for n in runtime.nodes()) // 2**20 * 2
    with pytest.raises(TransientError, match="MiB free"):
        runtime.ensure_server(new_server(runtime, memory_limit=f"{huge}m")[0])

    # Its data removed on its node, by a one-off helper there.
    runtime.remove_server(copy_id)
    assert f"dbprov-{copy_id}-data" not in second_node.volumes()


def test_a_lost_node_keeps_its_databases_until_it_is_back(runtime, second_node, manager_excluded):
    spec, database_id = new_server(runtime)
    with connect_when_up(runtime.ensure_server(spec)) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 'survived' AS n")
    second_node.container.stop(timeout=2)
    try:
        wait_until(lambda: second_node.state() == "down", timeout=60, what="the node to be down")
        info = runtime.inspect_server(database_id)
        assert info.state == UNREACHABLE and info.has_data, info
        assert info.reason.endswith(f"({second_node.id}) is down"), info
        listed = {s.database_id: s for s in runtime.list_servers()}[database_id]
        assert listed.state == UNREACHABLE and "is down" in listed.reason
        # Never made anew elsewhere: its data is on that node.
        with pytest.raises(NodeUnavailable, match="is down"):
            runtime.ensure_server(spec)
        with pytest.raises(NodeUnavailable, match="is down"):
            runtime.start_server(database_id)
        assert "unavailable" in runtime.server_logs(database_id)
    finally:
        second_node.container.start()
    wait_until(lambda: second_node.state() == "ready", timeout=90, what="the node to be back")
    wait_until(
        lambda: runtime.inspect_server(database_id).state == RUNNING, timeout=90,
        what="the server to run again on its node",
    )
    with connect_when_up(runtime.endpoint(database_id)) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == ("survived",)


def test_the_service_shows_a_lost_nodes_database_unavailable(
    swarm, second_node, manager_excluded, docker_client, tmp_path
):
    service = ServiceProcess(tmp_path, SWARM_ENV).start()
    try:
        created = service.request("POST", "/databases", json={}).json()
        assert created["status"] == "ready", created
        # Clients are sent to the node that holds it, not DBPROV_PUBLIC_HOST.
        assert created["host"] == second_node.address, created
        with psycopg.connect(created["connection_uri"], connect_timeout=10) as conn:
            conn.execute("CREATE TABLE kept AS SELECT 'through the outage' AS n")
        second_node.container.stop(timeout=2)
        try:
            wait_until(lambda: second_node.state() == "down", timeout=60, what="the node to be down")
            time.sleep(3)  # a few reconcile passes
            body = service.request("GET", f"/databases/{created['id']}").json()
            assert body["status"] == "unavailable" and "is down" in (body.get("last_error") or ""), body
            stop = service.request("POST", f"/databases/{created['id']}/stop")
            assert stop.status_code == 409 and "is unavailable" in stop.json()["detail"], stop.text
        finally:
            second_node.container.start()
        wait_until(lambda: second_node.state() == "ready", timeout=90, what="the node to be back")
        service.wait_for_status(created["id"], "ready", timeout=90)
        # Where the node is now: its address may have changed with its restart.
        credentials = service.request("GET", f"/databases/{created['id']}/credentials").json()
        assert credentials["host"] == second_node.address, credentials
        with psycopg.connect(credentials["connection_uri"], connect_timeout=10) as conn:
            assert conn.execute("SELECT n FROM kept").fetchone() == ("through the outage",)
        events = service.request("GET", f"/databases/{created['id']}/events").json()["items"]
        assert [e["kind"] for e in events][-2:] == ["unavailable", "available"], events
    finally:
        wait_until(lambda: second_node.state() == "ready", timeout=90, what="the node to be back")
        service.delete_all()
        service.stop()
        assert_nothing_left(docker_client)
