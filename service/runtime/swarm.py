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

import logging
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import docker
import docker.errors
from docker.utils import parse_repository_tag

from ..errors import (
    DbprovError,
    EngineError,
    ImageMissing,
    NotFound,
    NotSupported,
    RuntimeUnavailable,
)
from ..settings import size_in_bytes
from ..storage.overlay import OverlayStorage
from .engine import LABEL_JOB, Engine, translated
from .protocol import (
    ABSENT,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    PGDATA,
    Endpoint,
    JobResult,
    ServerInfo,
    ServerSpec,
    StorageReport,
    container_name,
    volume_name,
)
from .swarm_placement import (
    LABEL_IMAGE,
    Node,
    Placement,
    constrained_node,
    marker_labels,
    marker_node,
    node_text,
)
from .swarm_services import DONE, Services, database_id_of, replicas, server_info, serves_tls, volume_mount

log = logging.getLogger(__name__)

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


class SwarmRuntime:
    """A ``ServerRuntime`` on the Swarm whose manager the ``DOCKER_*`` variables name."""

    # A server's port is on its node: a sleeping database's listener would have
    # to run there, and the service runs on the manager.
    publishes_here = False

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
        self.helper_image = helper_image
        # The manager's own engine: images, and jobs beside servers on this node.
        self.engine = Engine(pull=pull, client=client)
        self.placement = Placement(self.engine, instance, exclude_label, host_label, overcommit, max_per_node)
        self.services = Services(self.engine, instance, start_timeout, port_grace)
        self._labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: instance}

    @property
    def client(self) -> "docker.DockerClient":
        return self.engine.client

    @property
    def no_new_privileges(self) -> bool | None:
        """Whether the engine keeps NoNewPrivileges in a service's spec (API 1.46
        and later); None until the first service says."""
        return self.services.no_new_privileges

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
            network = self.services.ensure_network(spec.database_id)
            service = self.services.service(name)
            if service is None:
                self.services.await_predecessor(name, node.id == self.placement.local_node_id())
                try:
                    self.services.create(spec, node, self.placement.host(node), network)
                except docker.errors.APIError as exc:
                    if not re.search(r"network \S+ not found", str(exc.explanation)):
                        raise
                    network = self.services.replace_network(spec.database_id, network)
                    self.services.create(spec, node, self.placement.host(node), network)
            elif replicas(service) != 1:
                self.services.scale(service, 1)
            service = self.services.await_running(spec, node)
            return Endpoint(self.placement.host(node), spec.port, serves_tls(service))

    def stop_server(self, database_id: str) -> None:
        name = container_name(database_id)
        with translated():
            service = self.services.service(name)
            if service is None:
                return  # no server, nothing running
            if replicas(service) != 0:
                self.services.scale(service, 0)
            node = self.placement.nodes().get(constrained_node(service) or "")
            if node is None or not node.ready:
                # Its node stops the task when it is back; nothing to wait for.
                return
            deadline = time.monotonic() + 45
            if node.id == self.placement.local_node_id():
                # Swarm's agent acts on a scale some 3 s later. Once the
                # orchestrator wants no task running (so none is restarted),
                # the engine at hand stops the server (SIGINT, a fast shutdown).
                while any(t.get("DesiredState") == "running" for t in self.services.tasks(name)):
                    if time.monotonic() > deadline:
                        raise EngineError(f"the server of {database_id} is still wanted after 45 s")
                    time.sleep(0.05)
                for task in self.services.task_containers(name, running=True):
                    try:
                        self.client.api.stop(task["Id"], timeout=30)
                    except docker.errors.NotFound:
                        pass
                return
            # Like `docker stop`, return once the server is down: a copy of the
            # data taken next must be consistent. The grace period is 30 s.
            while any(t["Status"]["State"] not in DONE for t in self.services.tasks(name)):
                if time.monotonic() > deadline:
                    raise EngineError(f"the server of {database_id} did not stop within 45 s")
                time.sleep(0.2)

    def start_server(self, database_id: str) -> None:
        with translated():
            service = self.services.service(container_name(database_id))
            if service is None:
                raise NotFound(f"database {database_id} has no server to start")
            self.placement.require_up(constrained_node(service), database_id)
            if replicas(service) != 1:
                self.services.scale(service, 1)

    def remove_server(self, database_id: str, keep_data: bool = False) -> None:
        name = container_name(database_id)
        with translated():
            self.services.remove_jobs(database_id)
            try:
                self.client.api.remove_service(name)
            except docker.errors.NotFound:
                pass
            if not keep_data:
                # The data goes too, so the server need not stop cleanly: its
                # container goes now rather than when Swarm's agent gets to it.
                for task in self.services.task_containers(name):
                    self.engine.remove_container(task["Id"])
            self.services.remove_network(database_id)
            if keep_data:
                return
            marker = self.placement.marker(database_id)
            node_id = marker_node(marker) if marker else None
            if node_id is None and self._local_volume(database_id):
                node_id = self.placement.local_node_id()
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
            service = self.services.service(name)
            marker = self.placement.marker(database_id)
            node_id = marker_node(marker) if marker else None
            has_data = marker is not None
            if not has_data and self._local_volume(database_id):
                has_data, node_id = True, self.placement.local_node_id()
            if service is None and not has_data:
                return None
            node_id = node_id or constrained_node(service)
            tasks = self.services.tasks(name) if service is not None else []
            nodes = self.placement.nodes()
        return server_info(database_id, service, tasks, node_id, nodes, has_data, self.services.port_grace)

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
            nodes = self.placement.nodes()
            local = self.placement.local_node_id() if volumes else None
        by_service: dict[str, list[dict]] = {}
        for task in tasks:
            by_service.setdefault(task["ServiceID"], []).append(task)
        # Where each database's data is: a placement, or a volume on this node.
        data: dict[str, str | None] = {}
        for volume in volumes:
            data[database_id_of(volume.get("Labels"))] = local
        for marker in markers:
            data[database_id_of(marker["Spec"].get("Labels"))] = marker_node(marker)
        data.pop(None, None)
        servers: dict[str, ServerInfo | None] = {}
        for service in services:
            database_id = database_id_of(service["Spec"].get("Labels"))
            if database_id is None:
                continue
            node_id = data.get(database_id) or constrained_node(service)
            servers[database_id] = server_info(
                database_id, service, by_service.get(service["ID"], []), node_id, nodes,
                database_id in data, self.services.port_grace,
            )
        for database_id, node_id in data.items():
            if database_id not in servers:
                servers[database_id] = server_info(database_id, None, [], node_id, nodes, True, 0)
        for network in networks:
            # Left by an ensure that stopped between its network and its
            # service: reported, so that the orphan sweep removes it.
            database_id = database_id_of(network.get("Labels"))
            if database_id is not None and database_id not in servers:
                servers[database_id] = ServerInfo(database_id, ABSENT, False, "only its network is left")
        return [info for info in servers.values() if info is not None]

    def server_logs(self, database_id: str, tail: int = 30) -> str:
        try:
            with translated():
                service = self.services.service(container_name(database_id))
                if service is None:
                    return "(no server)"
                node = self.placement.nodes().get(constrained_node(service) or "")
                if node is None or not node.ready:
                    # The manager would wait for the node's log stream.
                    return f"(logs unavailable: {node_text(node, constrained_node(service))})"
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
            service = self.services.service(container_name(database_id))
            if service is None:
                return None
            ports = ((service.get("Endpoint") or {}).get("Spec") or {}).get("Ports") or []
            published = [p for p in ports if p.get("TargetPort") == 5432 and p.get("PublishedPort")]
            node = self.placement.nodes().get(constrained_node(service) or "")
        if not published or node is None:
            return None
        return Endpoint(self.placement.host(node), int(published[0]["PublishedPort"]), serves_tls(service))

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
            if node_id == self.placement.local_node_id():
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
            return self.services.job_service(
                database_id, node_id, image, command,
                mounts=[volume_mount(database_id, PGDATA, self.services.labels_of(database_id))],
                environment=env, network=self.services.ensure_network(database_id), timeout=timeout,
            )

    def stream_job(
        self, database_id: str, command: list[str], environment: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        with translated():
            node_id, image = self._data_home(database_id)
            if node_id != self.placement.local_node_id():
                raise NotSupported(
                    f"streaming a job's output for database {database_id}, whose data is on another "
                    "Swarm node: a service's log is line by line and has no end to follow to "
                    "(see docs/scale-out.md)"
                )
            container = self._local_container(database_id, image, command, environment)
        yield from self.engine.stream(container, command)

    def copies_live(self, database_id: str) -> bool:
        return False

    def storage_report(self) -> StorageReport:
        return StorageReport(
            "copy", "on Swarm a node's local volumes hold its servers' data, and a copy is made on "
            "the source's node by a job (thin copies need a pool per node: see docs/scale-out.md)",
        )

    def copy_data(self, source_id: str, target_id: str, image: str) -> int:
        with translated():
            node_id, _ = self._data_home(source_id, image)
            # A local volume cannot be copied across nodes: the copy lives
            # where its source does, and the target's server will too.
            target_node = self.placement.record(target_id, node_id, image)
            if target_node != node_id:
                raise NotSupported(
                    f"database {target_id} already has data on node {target_node}, and a copy "
                    f"of {source_id} can only be made on its node {node_id}"
                )
            result = self.services.job_service(
                target_id, node_id, image,
                # -a keeps owners and modes: the server runs as its own user on them.
                ["sh", "-c", "cp -a /source/. /target/ && du -sb /target | cut -f1"],
                mounts=[
                    volume_mount(source_id, "/source", self.services.labels_of(source_id), read_only=True),
                    volume_mount(target_id, "/target", self.services.labels_of(target_id)),
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
            return list(self.placement.nodes().values())

    def _placement(self, spec: ServerSpec) -> Node:
        """The node of this database's data: recorded, or chosen now and recorded."""
        marker = self.placement.marker(spec.database_id)
        if marker is not None:
            node_id = marker_node(marker)
        elif self._local_volume(spec.database_id):
            # Data made before its placement was recorded (by hand, or by a
            # copy interrupted at the wrong moment) stays where it is.
            node_id = self.placement.record(spec.database_id, self.placement.local_node_id(), spec.image)
        else:
            node = self.placement.choose(size_in_bytes(spec.memory_limit))
            node_id = self.placement.record(spec.database_id, node.id, spec.image)
            log.info("database %s: placed on node %s (%s)", spec.database_id, node.hostname, node.id)
        return self.placement.require_up(node_id, spec.database_id)

    def _data_home(self, database_id: str, image: str | None = None) -> tuple[str, str]:
        """The node holding the data (which must be up), and ``image`` or else the server's."""
        marker = self.placement.marker(database_id)
        service = self.services.service(container_name(database_id))
        node_id = marker_node(marker) if marker else constrained_node(service) if service else None
        if node_id is None and self._local_volume(database_id):
            node_id = self.placement.local_node_id()
        if node_id is None:
            raise NotFound(f"database {database_id} has no data")
        image = image or (
            service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] if service
            else marker_labels(marker).get(LABEL_IMAGE) if marker else None
        )
        if not image:
            raise NotFound(f"database {database_id} has no server")
        self.placement.require_up(node_id, database_id)
        return node_id, image.split("@", 1)[0]

    # -- services ---------------------------------------------------------------

    # -- networks and volumes ---------------------------------------------------

    def _local_volume(self, database_id: str) -> bool:
        return self.engine.volume(volume_name(database_id)) is not None

    def _remove_volume(self, database_id: str, node_id: str) -> None:
        name = volume_name(database_id)
        if node_id == self.placement.local_node_id():
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
        node = self.placement.nodes().get(node_id)
        if node is None:
            # Removed from the swarm (docker node rm): its volumes went with it,
            # as far as this swarm can ever tell.
            log.warning(
                "database %s: its data was on node %s, which has left the swarm", database_id, node_id
            )
            return
        self.placement.require_up(node_id, database_id)
        result = self.services.job_service(
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

    def _local_container(
        self, database_id: str, image: str, command: list[str], environment: dict[str, str] | None
    ):
        """A job container on this engine: on the data, in the running server's network namespace."""
        running = self.services.task_containers(container_name(database_id), running=True)
        return self.engine.job_container(
            database_id,
            self.services.labels_of(database_id),
            image,
            command,
            {volume_name(database_id): {"bind": PGDATA, "mode": "rw"}},
            # The server on 127.0.0.1:5432 while it runs; no network while it is stopped.
            network_mode=f"container:{running[0]['Id']}" if running else "none",
            environment=environment,
        )
