"""Docker Swarm behind ``ServerRuntime``: each database a one-replica service on a cluster.

A server is a service ``dbprov-<id>`` (one replica, labelled ``io.dbprov.*``
like the Docker runtime's containers) on a local volume ``dbprov-<id>-data``.
A local volume exists on one node only, so the service is pinned to that node
by a placement constraint, and the choice is recorded in the cluster itself:
a Swarm config ``dbprov-<id>-placement`` per database, made before the volume
and removed after it. It outlives the service, so a service removed behind
dbprov's back, or a node that went down, never sends a database to a node
without its data.

The port is published in host mode on that node (the routing mesh adds a hop
and does not work everywhere), so the server answers at the node's address,
or at the host name an operator put in a node label. Each database has an
overlay network of its own: Swarm's overlays cannot refuse traffic between
their containers the way the Docker runtime's bridge does, and a task with no
network lands on the default bridge, where they all could talk. Alone on its
network, and on ``docker_gwbridge`` (which Swarm makes without inter-container
traffic) for its published port, a server reaches no other.

The errors of the engine are translated in one place, ``engine.translated``,
and images are looked up on the manager's engine.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import docker
import docker.errors
from docker.utils import parse_repository_tag

from ..errors import (
    DbprovError,
    EngineError,
    ImageMissing,
    JobTimedOut,
    NodeUnavailable,
    NotFound,
    NotSupported,
    PortInUse,
    RuntimeUnavailable,
    TransientError,
)
from ..storage.overlay import OverlayStorage
from .engine import LABEL_JOB, Engine, translated, when
from .entry import carries_tls, tls_entry
from .protocol import (
    ABSENT,
    CRASHED,
    LABEL_DATABASE_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    PGDATA,
    RUNNING,
    STOPPED,
    UNREACHABLE,
    Endpoint,
    JobResult,
    ServerInfo,
    ServerSpec,
    container_name,
    labels_for,
    volume_name,
)

log = logging.getLogger(__name__)

# On a placement config: the node holding the data, and the server's image
# (for jobs on the data while no service exists, a snapshot's say).
LABEL_NODE = "io.dbprov.node"
LABEL_IMAGE = "io.dbprov.image"
# Set by Swarm on every task container.
_SERVICE_LABEL = "com.docker.swarm.service.name"

# A task's states before it runs, and those of a task that failed.
_BEFORE_RUNNING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
_FAILED = {"failed", "rejected"}
_DONE = {"complete", "shutdown", "failed", "rejected", "orphaned", "remove"}
# A host port taken on the node: by a program (the kernel's bind()) or by
# another Swarm task (the scheduler's words, on a task left pending).
_PORT_TAKEN = ("address already in use", "port is already allocated", "host-mode port already in use")
_NO_IMAGE = ("no such image", "pull access denied", "manifest unknown", "repository does not exist")
_NANO = 1_000_000_000

# Removes a volume through the node's socket with nothing but python3's
# standard library, so that any image with python3 can be the helper.
_REMOVE_VOLUME = """
import http.client, socket, sys, time
class Connection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("/var/run/docker.sock")
for attempt in range(60):
    connection = Connection("localhost", timeout=60)
    connection.request("DELETE", "/volumes/" + sys.argv[1])
    response = connection.getresponse()
    text = response.read().decode(errors="replace").strip()
    if response.status != 409:
        break
    # In use: the server's container is on its way out.
    time.sleep(0.5)
print(response.status, text)
sys.exit(0 if response.status in (204, 404) else 1)
"""


def placement_name(database_id: str) -> str:
    return f"dbprov-{database_id}-placement"


def network_name(database_id: str) -> str:
    return f"dbprov-{database_id}-net"


@dataclass(frozen=True)
class Node:
    """A Swarm node as placement sees it."""

    id: str
    hostname: str
    address: str
    # "ready", "down", "unknown" or "disconnected".
    state: str
    # "active", "pause" or "drain".
    availability: str
    memory: int
    labels: dict

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class SwarmRuntime:
    """A ``ServerRuntime`` on the Swarm whose manager the ``DOCKER_*`` variables name."""

    def __init__(
        self,
        instance: str,
        pull: bool = True,
        exclude_label: str = "io.dbprov.exclude",
        host_label: str = "io.dbprov.public-host",
        overcommit: float = 1.0,
        max_per_node: int | None = None,
        helper_image: str = "python:3.11-slim",
        start_timeout: float = 60.0,
        port_grace: float = 10.0,
        client: "docker.DockerClient | None" = None,
    ) -> None:
        self.instance = instance
        self.exclude_label = exclude_label
        self.host_label = host_label
        self.overcommit = overcommit
        self.max_per_node = max_per_node
        self.helper_image = helper_image
        self.start_timeout = start_timeout
        # How long a taken port is waited for before the database moves to another.
        self.port_grace = port_grace
        # The manager's own engine: images, and jobs beside servers on this node.
        self.engine = Engine(pull=pull, client=client)
        self._labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: instance}
        self._local_node: str | None = None
        # Whether the engine keeps NoNewPrivileges in a service's spec (API 1.46
        # and later); None until the first service says.
        self.no_new_privileges: bool | None = None
        self._warned = threading.Event()

    @property
    def client(self) -> "docker.DockerClient":
        return self.engine.client

    def ping(self) -> None:
        with translated():
            swarm = self.client.info().get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise RuntimeUnavailable(
                f"the engine is not a Swarm manager (swarm: {swarm.get('LocalNodeState', 'unknown')}); "
                "DBPROV_RUNTIME=swarm needs the socket of a manager"
            )

    def has_image(self, image: str) -> bool:
        # The manager's engine; each node pulls for itself when a task starts there.
        return self.engine.has_image(image)

    def pull_image(self, image: str, progress: Callable[[str], None] | None = None) -> None:
        self.engine.pull_image(image, progress)

    # -- servers --------------------------------------------------------------

    def ensure_server(self, spec: ServerSpec) -> Endpoint:
        name = container_name(spec.database_id)
        with translated():
            node = self._placement(spec)
            network = self._ensure_network(spec.database_id)
            service = self._service(name)
            if service is None:
                self._await_predecessor(name, node)
                try:
                    self._create_service(spec, node, network)
                except docker.errors.APIError as exc:
                    if not re.search(r"network \S+ not found", str(exc.explanation)):
                        raise
                    network = self._replace_network(spec.database_id, network)
                    self._create_service(spec, node, network)
            elif _replicas(service) != 1:
                self._scale(service, 1)
            service = self._await_running(spec, node)
            return Endpoint(self._host(node), spec.port, _serves_tls(service))

    def stop_server(self, database_id: str) -> None:
        name = container_name(database_id)
        with translated():
            service = self._service(name)
            if service is None:
                return  # no server, nothing running
            if _replicas(service) != 0:
                self._scale(service, 0)
            node = self._nodes().get(_constrained_node(service) or "")
            if node is None or not node.ready:
                # Its node stops the task when it is back; nothing to wait for.
                return
            deadline = time.monotonic() + 45
            if node.id == self._local_node_id():
                # Swarm's agent acts on a scale some 3 s later. Once the
                # orchestrator wants no task running (so none is restarted),
                # the engine at hand stops the server (SIGINT, a fast shutdown).
                while any(t.get("DesiredState") == "running" for t in self._tasks(name)):
                    if time.monotonic() > deadline:
                        raise EngineError(f"the server of {database_id} is still wanted after 45 s")
                    time.sleep(0.05)
                for task in self._task_containers(name, running=True):
                    try:
                        self.client.api.stop(task["Id"], timeout=30)
                    except docker.errors.NotFound:
                        pass
                return
            # Like `docker stop`, return once the server is down: a copy of the
            # data taken next must be consistent. The grace period is 30 s.
            while any(t["Status"]["State"] not in _DONE for t in self._tasks(name)):
                if time.monotonic() > deadline:
                    raise EngineError(f"the server of {database_id} did not stop within 45 s")
                time.sleep(0.2)

    def start_server(self, database_id: str) -> None:
        with translated():
            service = self._service(container_name(database_id))
            if service is None:
                raise NotFound(f"database {database_id} has no server to start")
            self._require_up(_constrained_node(service), database_id)
            if _replicas(service) != 1:
                self._scale(service, 1)

    def remove_server(self, database_id: str, keep_data: bool = False) -> None:
        name = container_name(database_id)
        with translated():
            self._remove_jobs(database_id)
            try:
                self.client.api.remove_service(name)
            except docker.errors.NotFound:
                pass
            if not keep_data:
                # The data goes too, so the server need not stop cleanly: its
                # container goes now rather than when Swarm's agent gets to it.
                for task in self._task_containers(name):
                    self.engine.remove_container(task["Id"])
            self._remove_network(database_id)
            if keep_data:
                return
            marker = self._marker(database_id)
            node_id = _marker_node(marker) if marker else None
            if node_id is None and self._local_volume(database_id):
                node_id = self._local_node_id()
            if node_id is not None:
                self._remove_volume(database_id, node_id)
            if marker is not None:
                try:
                    self.client.api.remove_config(marker["ID"])
                except docker.errors.NotFound:
                    pass

    def inspect_server(self, database_id: str) -> ServerInfo | None:
        name = container_name(database_id)
        with translated():
            service = self._service(name)
            marker = self._marker(database_id)
            node_id = _marker_node(marker) if marker else None
            has_data = marker is not None
            if not has_data and self._local_volume(database_id):
                has_data, node_id = True, self._local_node_id()
            if service is None and not has_data:
                return None
            node_id = node_id or _constrained_node(service)
            tasks = self._tasks(name) if service is not None else []
            nodes = self._nodes()
        return _server_info(database_id, service, tasks, node_id, nodes, has_data)

    def runs_unbroken(self, database_id: str) -> bool | None:
        # Not followed: a task's events come from the node it runs on.
        return None

    def list_servers(self) -> list[ServerInfo]:
        filters = {"label": [f"{k}={v}" for k, v in self._labels.items()]}
        with translated():
            services = [
                s for s in self.client.api.services(filters=filters)
                if LABEL_JOB not in (s["Spec"].get("Labels") or {})
            ]
            markers = self.client.api.configs(filters=filters)
            volumes = self.client.api.volumes(filters=filters).get("Volumes") or []
            networks = self.client.api.networks(filters=filters)
            service_ids = {s["ID"] for s in services}
            tasks = [t for t in self.client.api.tasks() if t.get("ServiceID") in service_ids]
            nodes = self._nodes()
            local = self._local_node_id() if volumes else None
        by_service: dict[str, list[dict]] = {}
        for task in tasks:
            by_service.setdefault(task["ServiceID"], []).append(task)
        # Where each database's data is: a placement, or a volume on this node.
        data: dict[str, str | None] = {}
        for volume in volumes:
            data[_database_id(volume.get("Labels"))] = local
        for marker in markers:
            data[_database_id(marker["Spec"].get("Labels"))] = _marker_node(marker)
        data.pop(None, None)
        servers: dict[str, ServerInfo | None] = {}
        for service in services:
            database_id = _database_id(service["Spec"].get("Labels"))
            if database_id is None:
                continue
            node_id = data.get(database_id) or _constrained_node(service)
            servers[database_id] = _server_info(
                database_id, service, by_service.get(service["ID"], []), node_id, nodes,
                database_id in data,
            )
        for database_id, node_id in data.items():
            if database_id not in servers:
                servers[database_id] = _server_info(database_id, None, [], node_id, nodes, True)
        for network in networks:
            # Left by an ensure that stopped between its network and its
            # service: reported, so that the orphan sweep removes it.
            database_id = _database_id(network.get("Labels"))
            if database_id is not None and database_id not in servers:
                servers[database_id] = ServerInfo(database_id, ABSENT, False, "only its network is left")
        return [info for info in servers.values() if info is not None]

    def server_logs(self, database_id: str, tail: int = 30) -> str:
        try:
            with translated():
                service = self._service(container_name(database_id))
                if service is None:
                    return "(no server)"
                node = self._nodes().get(_constrained_node(service) or "")
                if node is None or not node.ready:
                    # The manager would wait for the node's log stream.
                    return f"(logs unavailable: {_node_text(node, _constrained_node(service))})"
                chunks = self.client.api.service_logs(
                    service["ID"], stdout=True, stderr=True, tail=tail
                )
                raw = b"".join(chunks) if not isinstance(chunks, (bytes, str)) else chunks
        except DbprovError:
            return "(logs unavailable)"
        return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw

    def prune_caches(self) -> list[str]:
        # The manager's engine: each node keeps golden copies of its own, and
        # `dbprov images prune` against a node's engine (DOCKER_HOST) prunes there.
        with translated():
            return OverlayStorage(self.engine, self.instance).prune_caches()

    def endpoint(self, database_id: str) -> Endpoint | None:
        with translated():
            service = self._service(container_name(database_id))
            if service is None:
                return None
            ports = ((service.get("Endpoint") or {}).get("Spec") or {}).get("Ports") or []
            published = [p for p in ports if p.get("TargetPort") == 5432 and p.get("PublishedPort")]
            node = self._nodes().get(_constrained_node(service) or "")
        if not published or node is None:
            return None
        return Endpoint(self._host(node), int(published[0]["PublishedPort"]), _serves_tls(service))

    # -- jobs -------------------------------------------------------------------

    def run_job(
        self,
        database_id: str,
        command: list[str],
        environment: dict[str, str] | None = None,
        input_file: Path | None = None,
        timeout: float = 300.0,
    ) -> JobResult:
        with translated():
            node_id, image = self._data_home(database_id)
            if node_id == self._local_node_id():
                container = self._local_container(database_id, image, command, environment)
                return self.engine.run(container, command, input_file, timeout)
            if input_file is not None:
                raise NotSupported(
                    f"a job with an input file on database {database_id}, whose data is on another "
                    "Swarm node: Swarm cannot copy a file into a task (see docs/scale-out.md)"
                )
            # On another node a one-off service runs on the data, on the server's
            # own network: the server is "dbprov-<id>", not 127.0.0.1, so libpq is
            # pointed there.
            env = {"PGHOST": container_name(database_id), "PGPORT": "5432", **(environment or {})}
            return self._job_service(
                database_id, node_id, image, command,
                mounts=[_volume_mount(database_id, PGDATA, self._labels_of(database_id))],
                environment=env, network=self._ensure_network(database_id), timeout=timeout,
            )

    def stream_job(
        self, database_id: str, command: list[str], environment: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        with translated():
            node_id, image = self._data_home(database_id)
            if node_id != self._local_node_id():
                raise NotSupported(
                    f"streaming a job's output for database {database_id}, whose data is on another "
                    "Swarm node: a service's log is line by line and has no end to follow to "
                    "(see docs/scale-out.md)"
                )
            container = self._local_container(database_id, image, command, environment)
        yield from self.engine.stream(container, command)

    def copy_data(self, source_id: str, target_id: str, image: str) -> int:
        with translated():
            node_id, _ = self._data_home(source_id, image)
            # A local volume cannot be copied across nodes: the copy lives
            # where its source does, and the target's server will too.
            target_node = self._record_placement(target_id, node_id, image)
            if target_node != node_id:
                raise NotSupported(
                    f"database {target_id} already has data on node {target_node}, and a copy "
                    f"of {source_id} can only be made on its node {node_id}"
                )
            result = self._job_service(
                target_id, node_id, image,
                # -a keeps owners and modes: the server runs as its own user on them.
                ["sh", "-c", "cp -a /source/. /target/ && du -sb /target | cut -f1"],
                mounts=[
                    _volume_mount(source_id, "/source", self._labels_of(source_id), read_only=True),
                    _volume_mount(target_id, "/target", self._labels_of(target_id)),
                    # The image declares PGDATA a volume: a tmpfs there, or
                    # every job would leave an anonymous volume on the node.
                    {"Type": "tmpfs", "Target": PGDATA},
                ],
                timeout=3600.0,
            )
        lines = result.output.strip().splitlines()
        if result.exit_code != 0 or not lines or not lines[-1].strip().isdigit():
            raise EngineError(f"copying the data of {source_id} failed: {result.output.strip()}")
        return int(lines[-1].strip())

    # -- placement ----------------------------------------------------------------

    def nodes(self) -> list[Node]:
        """The swarm's nodes, for people and tests."""
        with translated():
            return list(self._nodes().values())

    def _placement(self, spec: ServerSpec) -> Node:
        """The node of this database's data: recorded, or chosen now and recorded."""
        marker = self._marker(spec.database_id)
        if marker is not None:
            node_id = _marker_node(marker)
        elif self._local_volume(spec.database_id):
            # Data made before its placement was recorded (by hand, or by a
            # copy interrupted at the wrong moment) stays where it is.
            node_id = self._record_placement(spec.database_id, self._local_node_id(), spec.image)
        else:
            node = self._choose_node(_bytes(spec.memory_limit))
            node_id = self._record_placement(spec.database_id, node.id, spec.image)
            log.info("database %s: placed on node %s (%s)", spec.database_id, node.hostname, node.id)
        return self._require_up(node_id, spec.database_id)

    def _choose_node(self, memory: int) -> Node:
        """The node with the fewest databases among those with room for ``memory``.

        A node's databases are the services placed on it, stopped ones too:
        each may start again at any time, and only there.
        """
        nodes = self._nodes()
        counts: dict[str, int] = {}
        promised: dict[str, int] = {}
        for service in self.client.api.services(filters={"label": [f"{LABEL_INSTANCE}={self.instance}"]}):
            node_id = _constrained_node(service)
            if node_id is None or LABEL_JOB in (service["Spec"].get("Labels") or {}):
                continue
            limits = (service["Spec"]["TaskTemplate"].get("Resources") or {}).get("Limits") or {}
            counts[node_id] = counts.get(node_id, 0) + 1
            promised[node_id] = promised.get(node_id, 0) + int(limits.get("MemoryBytes") or 0)
        candidates = []
        refusals = []
        for node in nodes.values():
            free = int(node.memory * self.overcommit) - promised.get(node.id, 0)
            if not node.ready or node.availability != "active":
                refusals.append(f"{node.hostname}: {node.state}, {node.availability}")
            elif _flag(node.labels.get(self.exclude_label)):
                refusals.append(f"{node.hostname}: labelled {self.exclude_label}")
            elif self.max_per_node is not None and counts.get(node.id, 0) >= self.max_per_node:
                refusals.append(f"{node.hostname}: {counts[node.id]} databases (DBPROV_SWARM_MAX_PER_NODE)")
            elif memory and free < memory:
                refusals.append(
                    f"{node.hostname}: {free // 2**20} MiB free of the {memory // 2**20} MiB asked"
                )
            else:
                candidates.append((counts.get(node.id, 0), -free, node.id, node))
        if not candidates:
            # Transient: a database deleted or a node added makes room.
            raise TransientError(f"no Swarm node can take the database ({'; '.join(refusals) or 'no nodes'})")
        return min(candidates)[3]

    def _record_placement(self, database_id: str, node_id: str, image: str) -> str:
        """Record ``node_id`` as the home of the data unless one is recorded; returns the recorded one."""
        labels = {**labels_for(self.instance, database_id), LABEL_NODE: node_id, LABEL_IMAGE: image}
        try:
            self.client.api.create_config(
                placement_name(database_id), json.dumps({"node": node_id}).encode(), labels=labels
            )
            return node_id
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        # Another process recorded it first: theirs stands.
        marker = self._marker(database_id)
        if marker is None:
            raise EngineError(f"the placement of database {database_id} changed while it was recorded")
        return _marker_node(marker)

    def _require_up(self, node_id: str | None, database_id: str) -> Node:
        node = self._nodes().get(node_id or "")
        if node is None or not node.ready:
            raise NodeUnavailable(
                f"{_node_text(node, node_id)}: database {database_id}'s data is on it, so its server "
                "waits for that node"
            )
        return node

    def _host(self, node: Node) -> str:
        return node.labels.get(self.host_label) or node.address

    def _data_home(self, database_id: str, image: str | None = None) -> tuple[str, str]:
        """The node holding the data (which must be up), and ``image`` or else the server's."""
        marker = self._marker(database_id)
        service = self._service(container_name(database_id))
        node_id = _marker_node(marker) if marker else _constrained_node(service) if service else None
        if node_id is None and self._local_volume(database_id):
            node_id = self._local_node_id()
        if node_id is None:
            raise NotFound(f"database {database_id} has no data")
        image = image or (
            service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] if service
            else _marker_labels(marker).get(LABEL_IMAGE) if marker else None
        )
        if not image:
            raise NotFound(f"database {database_id} has no server")
        self._require_up(node_id, database_id)
        return node_id, image.split("@", 1)[0]

    # -- services ---------------------------------------------------------------

    def _create_service(self, spec: ServerSpec, node: Node, network: str) -> None:
        labels = labels_for(self.instance, spec.database_id)
        limits: dict = {"Pids": spec.pids_limit or 0}
        if spec.memory_limit:
            limits["MemoryBytes"] = _bytes(spec.memory_limit)
        if spec.cpus:
            limits["NanoCPUs"] = int(spec.cpus * _NANO)
        container_spec: dict = {
            # Args, not Command: the image's entrypoint stays (with TLS, behind an entry of its own).
            "Args": list(spec.command),
            "Mounts": [_volume_mount(spec.database_id, PGDATA, labels)],
        }
        environment = spec.environment
        if spec.tls is not None:
            # No file can be put into a service's container before it starts:
            # the certificate and key come in its environment, and its entry
            # writes them, as the Docker runtime's does. Its name for clients
            # is the node's host, known only now.
            container_spec["Command"], container_spec["Args"], environment = tls_entry(
                spec.tls((self._host(node),)), self._entrypoint(spec.image), container_spec["Args"], environment
            )
        task_template = {
            "ContainerSpec": {
                **container_spec,
                "Image": spec.image,
                "Env": [f"{k}={v}" for k, v in environment.items()],
                "Labels": labels,
                # A fast shutdown, whatever the image says; after 30 s the engine kills.
                "StopSignal": "SIGINT",
                "StopGracePeriod": 30 * _NANO,
                # Kept by engines with API 1.46 and later; older ones drop it
                # (checked below, and said once in the log).
                "Privileges": {"NoNewPrivileges": True},
            },
            "Resources": {"Limits": limits},
            # Swarm replaces a task that exits, whatever its exit code: like
            # the Docker runtime's unless-stopped, a stop is a scale to 0.
            "RestartPolicy": {"Condition": "any", "Delay": _NANO, "MaxAttempts": 0},
            "Placement": {"Constraints": [f"node.id=={node.id}"]},
            "Networks": [{"Target": network}],
        }
        endpoint_spec = {
            # No virtual IP: clients come through the published port only.
            "Mode": "dnsrr",
            "Ports": [{
                "Protocol": "tcp", "TargetPort": 5432, "PublishedPort": spec.port, "PublishMode": "host",
            }],
        }
        try:
            created = self.client.api.create_service(
                task_template, name=container_name(spec.database_id), labels=labels,
                mode={"Replicated": {"Replicas": 1}}, endpoint_spec=endpoint_spec,
                # Never two servers on one data directory, even for a moment.
                update_config={"Parallelism": 1, "Order": "stop-first"},
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            return  # made by a concurrent ensure
        self._check_privileges(created["ID"])

    def _entrypoint(self, image: str) -> list[str]:
        """The image's entrypoint as the manager's engine has it: a service's
        Command replaces it, so one that wraps it must name it."""
        found = self.engine.image(image)
        if found is None and self.engine.pull:
            self.engine.pull_image(image)
            found = self.engine.image(image)
        if found is None:
            raise ImageMissing(
                f"the manager's engine has no image {image} and pulling is off (DBPROV_PULL_IMAGES)", image=image
            )
        return list(found["Config"].get("Entrypoint") or [])

    def _check_privileges(self, service_id: str) -> None:
        if self.no_new_privileges is not None:
            return
        spec = self.client.api.inspect_service(service_id)["Spec"]["TaskTemplate"]["ContainerSpec"]
        self.no_new_privileges = bool((spec.get("Privileges") or {}).get("NoNewPrivileges"))
        if not self.no_new_privileges and not self._warned.is_set():
            self._warned.set()
            log.warning(
                "this Swarm's engine (API %s) drops NoNewPrivileges from service specs (API 1.46 "
                "adds it): tenant servers run without no-new-privileges unless every node's daemon "
                "sets it (\"no-new-privileges\": true in daemon.json)",
                self.client.api.api_version,
            )

    def _await_running(self, spec: ServerSpec, node: Node) -> dict:
        """Wait until the server's task runs, and return its service; a port
        taken for good or a missing image ends it."""
        name = container_name(spec.database_id)
        started = time.monotonic()
        while True:
            service = self._service(name)
            if service is None:
                raise EngineError(f"the service of database {spec.database_id} vanished while starting")
            since = when(service.get("UpdatedAt") or service.get("CreatedAt"))
            tasks = self._tasks(name)
            current = [t for t in tasks if t.get("DesiredState") == "running"]
            if any(t["Status"]["State"] == "running" for t in current):
                return service
            recent = [t for t in tasks if when(t.get("CreatedAt")) >= since]
            for task in recent:
                error = (task["Status"].get("Err") or "").lower()
                # The port may be held for a moment by this database's own task
                # of before (its service removed behind dbprov's back, on a node
                # this engine cannot look into): Swarm tries again meanwhile.
                if any(p in error for p in _PORT_TAKEN) and time.monotonic() - started > self.port_grace:
                    # Leave nothing but the data behind: another port is tried next.
                    self.client.api.remove_service(service["ID"])
                    raise PortInUse(f"port {spec.port} on node {node.hostname}: {task['Status']['Err']}")
                if task["Status"]["State"] in _FAILED and any(p in error for p in _NO_IMAGE):
                    self.client.api.remove_service(service["ID"])
                    raise ImageMissing(
                        f"node {node.hostname} has no image {spec.image} and cannot pull it: "
                        f"{task['Status']['Err']}", image=spec.image,
                    )
            if any(_crashed(t) for t in recent):
                # It ran and crashed: the reconciler reads the restarts and the log.
                return service
            if time.monotonic() - started > self.start_timeout:
                states = ", ".join(
                    f"{t['Status']['State']}{': ' + t['Status']['Err'] if t['Status'].get('Err') else ''}"
                    for t in current
                ) or "no task"
                raise EngineError(
                    f"the server of {spec.database_id} is not running on node {node.hostname} "
                    f"after {self.start_timeout:g} s ({states})"
                )
            time.sleep(0.1)

    def _await_predecessor(self, name: str, node: Node) -> None:
        """Wait for the containers of a service of this name that is gone to leave this node.

        A service removed behind dbprov's back stops its task a few seconds
        later, and until then holds the port and the volume its successor needs.
        """
        if node.id != self._local_node_id():
            return  # Swarm's own retries cover other nodes
        deadline = time.monotonic() + 30
        while self._task_containers(name):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def _scale(self, service: dict, replicas: int) -> None:
        self.client.api.update_service(
            service["ID"], version=service["Version"]["Index"],
            mode={"Replicated": {"Replicas": replicas}}, fetch_current_spec=True,
        )

    def _service(self, name: str) -> dict | None:
        try:
            return self.client.api.inspect_service(name)
        except docker.errors.NotFound:
            return None

    def _task_containers(self, name: str, running: bool = False) -> list[dict]:
        """The containers of service ``name`` on the manager's own node."""
        filters: dict = {"label": [f"{_SERVICE_LABEL}={name}"]}
        if running:
            filters["status"] = "running"
        return self.client.api.containers(all=not running, filters=filters)

    def _tasks(self, name: str) -> list[dict]:
        try:
            return self.client.api.tasks(filters={"service": name})
        except docker.errors.NotFound:
            # Removed since it was looked up (by a sweep, a delete): no task is left.
            return []

    def _nodes(self) -> dict[str, Node]:
        return {n["ID"]: _node(n) for n in self.client.api.nodes()}

    def _local_node_id(self) -> str:
        if self._local_node is None:
            self._local_node = (self.client.info().get("Swarm") or {}).get("NodeID") or ""
        return self._local_node

    def _marker(self, database_id: str) -> dict | None:
        try:
            return self.client.api.inspect_config(placement_name(database_id))
        except docker.errors.NotFound:
            return None

    def _labels_of(self, database_id: str) -> dict[str, str]:
        return labels_for(self.instance, database_id)

    # -- networks and volumes ---------------------------------------------------

    def _ensure_network(self, database_id: str) -> str:
        """The database's own overlay network."""
        name = network_name(database_id)
        found = self._network(name)
        if found is not None:
            return found
        try:
            # Attachable: a job container on the manager can join it.
            return self.client.api.create_network(
                name, driver="overlay", attachable=True, labels=self._labels_of(database_id),
                check_duplicate=True,
            )["Id"]
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        found = self._network(name)
        if found is None:
            raise EngineError(f"network {name} vanished while it was made")
        return found

    def _replace_network(self, database_id: str, stale: str) -> str:
        """A network for one removed behind dbprov's back that a node still lists.

        The node lists it until its last container has left it, and no other
        of that name can be made until then.
        """
        deadline = time.monotonic() + 30
        while self._network(network_name(database_id)) == stale and time.monotonic() < deadline:
            time.sleep(0.2)
        return self._ensure_network(database_id)

    def _network(self, name: str) -> str | None:
        try:
            return self.client.api.inspect_network(name, scope="swarm")["Id"]
        except docker.errors.NotFound:
            return None

    def _remove_network(self, database_id: str) -> None:
        name = network_name(database_id)
        deadline = time.monotonic() + 30
        while True:
            network = self._network(name)
            if network is None:
                return
            try:
                self.client.api.remove_network(network)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError:
                # Still used by a task on its way out.
                if time.monotonic() > deadline:
                    raise
            # A node still lists a removed overlay until its last container
            # has left it, and a service made on that id would be refused.
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def _local_volume(self, database_id: str) -> bool:
        return self.engine.volume(volume_name(database_id)) is not None

    def _remove_volume(self, database_id: str, node_id: str) -> None:
        name = volume_name(database_id)
        if node_id == self._local_node_id():
            # Swarm removes a task's container a moment after its service.
            deadline = time.monotonic() + 30
            while True:
                try:
                    self.client.api.remove_volume(name)
                    return
                except docker.errors.NotFound:
                    return
                except docker.errors.APIError as exc:
                    if exc.status_code != 409 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        node = self._nodes().get(node_id)
        if node is None:
            # Removed from the swarm (docker node rm): its volumes went with it,
            # as far as this swarm can ever tell.
            log.warning(
                "database %s: its data was on node %s, which has left the swarm", database_id, node_id
            )
            return
        self._require_up(node_id, database_id)
        result = self._job_service(
            database_id, node_id, self._pinned_helper(), ["python3", "-c", _REMOVE_VOLUME, name],
            mounts=[{"Type": "bind", "Source": "/var/run/docker.sock", "Target": "/var/run/docker.sock"}],
            timeout=120.0,
        )
        if result.exit_code != 0:
            raise EngineError(
                f"removing volume {name} on node {node.hostname} failed: {result.output.strip()}"
            )

    def _pinned_helper(self) -> str:
        """The helper image as the manager's engine holds it now, named by its
        content: the digest a registry gave it, or else (a local build) its ID.

        Given a tag, a node's engine pulls it again whenever a task starts, to
        follow it, and would run whatever the registry serves by then, with the
        node's socket mounted. A node given a digest runs the image it has, or
        pulls exactly that one; an ID is never pulled, so the node must hold
        that very image (``docker save | docker load`` keeps the ID). Looked up
        at each use: an operator's update of the image on the manager counts
        from the next removal on.
        """
        image = self.engine.image(self.helper_image)
        if image is None and self.engine.pull:
            # Swarm pulls a service's image by digest, which may leave it
            # untagged: dbprov's own (deploy/stack.yaml's helper) among them.
            try:
                self.engine.pull_image(self.helper_image)
            except ImageMissing as exc:
                # A missing helper must hold the deletion up, not fail it.
                raise EngineError(f"{exc.detail} (DBPROV_SWARM_HELPER_IMAGE)") from None
            image = self.engine.image(self.helper_image)
        if image is None:
            raise EngineError(
                f"the manager's engine has no image {self.helper_image} (DBPROV_SWARM_HELPER_IMAGE) "
                "to remove a volume on another node with: pull or load it there"
            )
        repository = parse_repository_tag(self.helper_image)[0]
        by_digest = [d for d in image.get("RepoDigests") or [] if d.rpartition("@")[0] == repository]
        return by_digest[0] if by_digest else image["Id"]

    # -- jobs ---------------------------------------------------------------------

    def _job_service(
        self,
        database_id: str,
        node_id: str,
        image: str,
        command: list[str],
        mounts: list[dict],
        environment: dict[str, str] | None = None,
        network: str | None = None,
        timeout: float = 300.0,
    ) -> JobResult:
        """Run ``command`` once as a one-off service on ``node_id``; its output and exit code."""
        name = f"{container_name(database_id)}-job-{secrets.token_hex(3)}"
        task_template: dict = {
            "ContainerSpec": {
                "Image": image,
                "Command": command[:1],
                "Args": command[1:],
                "Env": [f"{k}={v}" for k, v in (environment or {}).items()],
                "Labels": {**self._labels_of(database_id), LABEL_JOB: "true"},
                "Mounts": mounts,
                "Privileges": {"NoNewPrivileges": True},
            },
            "RestartPolicy": {"Condition": "none"},
            "Placement": {"Constraints": [f"node.id=={node_id}"]},
        }
        if network:
            task_template["Networks"] = [{"Target": network}]
        service = self.client.api.create_service(
            task_template, name=name, labels={**self._labels_of(database_id), LABEL_JOB: "true"},
            # Not a replicated-job: Swarm (20.10) leaves the containers of a
            # finished job behind when its service goes, holding its volumes.
            mode={"Replicated": {"Replicas": 1}},
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                tasks = self._tasks(name)
                done = [t for t in tasks if t["Status"]["State"] in _DONE]
                if done:
                    task = done[0]
                    break
                if time.monotonic() > deadline:
                    raise JobTimedOut(f"{command[0]} ran longer than {timeout:g} s and was stopped")
                time.sleep(0.1)
            status = task["Status"]
            if status["State"] == "rejected":
                raise EngineError(f"job {command[0]} could not start: {status.get('Err')}")
            exit_code = (status.get("ContainerStatus") or {}).get("ExitCode")
            if exit_code is None:
                exit_code = 0 if status["State"] == "complete" else -1
            chunks = self.client.api.service_logs(service["ID"], stdout=True, stderr=True)
            raw = b"".join(chunks) if not isinstance(chunks, (bytes, str)) else chunks
            output = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
            return JobResult(exit_code=exit_code, output=output)
        finally:
            try:
                self.client.api.remove_service(service["ID"])
            except docker.errors.NotFound:
                pass

    def _local_container(
        self, database_id: str, image: str, command: list[str], environment: dict[str, str] | None
    ):
        """A job container on this engine: on the data, in the running server's network namespace."""
        running = self._task_containers(container_name(database_id), running=True)
        return self.engine.job_container(
            database_id,
            self._labels_of(database_id),
            image,
            command,
            {volume_name(database_id): {"bind": PGDATA, "mode": "rw"}},
            # The server on 127.0.0.1:5432 while it runs; no network while it is stopped.
            network_mode=f"container:{running[0]['Id']}" if running else "none",
            environment=environment,
        )

    def _remove_jobs(self, database_id: str) -> None:
        selector = {"label": [f"{LABEL_DATABASE_ID}={database_id}", LABEL_JOB]}
        for job in self.client.api.services(filters=selector):
            try:
                self.client.api.remove_service(job["ID"])
            except docker.errors.NotFound:
                pass
        for job in self.client.api.containers(all=True, filters=selector):
            self.engine.remove_container(job["Id"])


def _server_info(
    database_id: str,
    service: dict | None,
    tasks: list[dict],
    node_id: str | None,
    nodes: dict[str, Node],
    has_data: bool,
) -> ServerInfo | None:
    """Swarm's view of a database as a server state."""
    node = nodes.get(node_id or "")
    if node_id and (node is None or not node.ready):
        # Not ABSENT even without a service: the data is on that node, and a
        # server made anew elsewhere would start empty.
        return ServerInfo(database_id, UNREACHABLE, has_data, _node_text(node, node_id))
    if service is None:
        return ServerInfo(database_id, ABSENT, True, "no service") if has_data else None
    if _replicas(service) == 0:
        return ServerInfo(database_id, STOPPED, has_data, "scaled to 0 replicas")
    since = when(service.get("UpdatedAt") or service.get("CreatedAt"))
    failures = [t for t in tasks if _crashed(t) and when(t.get("CreatedAt")) >= since]
    restarts = len(failures)
    current = max(
        (t for t in tasks if t.get("DesiredState") == "running"),
        key=lambda t: when(t.get("CreatedAt")), default=None,
    )
    where = f" on {node.hostname}" if node else ""
    after = f" after {restarts} restart(s)" if restarts else ""
    last = f"; last failure: {failures[-1]['Status'].get('Err')}" if failures else ""
    if current is None:
        if not failures:
            # Scaled up a moment ago: the orchestrator is making its task.
            return ServerInfo(database_id, RUNNING, has_data, f"starting{where}", restarts)
        return ServerInfo(database_id, CRASHED, has_data, f"no task{where}{after}{last}", restarts)
    state = current["Status"]["State"]
    error = current["Status"].get("Err")
    if state == "running":
        return ServerInfo(database_id, RUNNING, has_data, f"running{where}{after}", restarts)
    if state in _BEFORE_RUNNING and not error and not failures:
        return ServerInfo(database_id, RUNNING, has_data, f"{state}{where}", restarts)
    detail = f": {error}" if error else ""
    return ServerInfo(database_id, CRASHED, has_data, f"{state}{detail}{where}{after}{last}", restarts)


def _crashed(task: dict) -> bool:
    """Whether a task ran and failed (rather than never started: a port, an image)."""
    status = task["Status"]
    return status["State"] in _FAILED and "non-zero exit" in (status.get("Err") or "")


def _node(attrs: dict) -> Node:
    status = attrs.get("Status") or {}
    address = status.get("Addr") or ""
    if address in ("", "0.0.0.0"):
        # A manager may report no address of its own; its manager address has it.
        manager = (attrs.get("ManagerStatus") or {}).get("Addr") or ""
        address = manager.rsplit(":", 1)[0] or address
    spec = attrs.get("Spec") or {}
    description = attrs.get("Description") or {}
    return Node(
        id=attrs["ID"],
        hostname=description.get("Hostname") or attrs["ID"],
        address=address,
        state=status.get("State", "unknown"),
        availability=spec.get("Availability", "active"),
        memory=int(((description.get("Resources") or {}).get("MemoryBytes")) or 0),
        labels=spec.get("Labels") or {},
    )


def _node_text(node: Node | None, node_id: str | None) -> str:
    if node is None:
        return f"node {node_id} has left the swarm"
    # The id too: `docker node rm` takes it, and host names may repeat.
    return f"node {node.hostname} ({node.id}) is {node.state}"


def _serves_tls(service: dict) -> bool:
    """Whether a server's service was made with a certificate."""
    return carries_tls(service["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env"))


def _replicas(service: dict) -> int:
    return int(((service["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas", 0))


def _constrained_node(service: dict | None) -> str | None:
    if service is None:
        return None
    constraints = ((service["Spec"]["TaskTemplate"].get("Placement") or {}).get("Constraints")) or []
    for constraint in constraints:
        match = re.fullmatch(r"\s*node\.id\s*==\s*(\S+)\s*", constraint)
        if match:
            return match[1]
    return None


def _marker_labels(marker: dict | None) -> dict:
    return ((marker or {}).get("Spec") or {}).get("Labels") or {}


def _marker_node(marker: dict) -> str:
    return _marker_labels(marker)[LABEL_NODE]


def _database_id(labels: dict | None) -> str | None:
    return (labels or {}).get(LABEL_DATABASE_ID)


def _volume_mount(database_id: str, target: str, labels: dict, read_only: bool = False) -> dict:
    # The node makes the volume, labelled, when the task starts there.
    return {
        "Type": "volume", "Source": volume_name(database_id), "Target": target,
        "ReadOnly": read_only, "VolumeOptions": {"Labels": labels},
    }


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("false", "0", "no", "off")


def _bytes(size: str | None) -> int:
    """``512m``, ``1g`` and the like in bytes; 0 for no limit."""
    if not size:
        return 0
    match = re.fullmatch(r"([0-9]+)([bkmg]?)", size.strip().lower())
    if not match:
        raise ValueError(f"not a size: {size!r}")
    return int(match[1]) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2]]
