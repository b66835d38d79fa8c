"""One Docker engine behind ``ServerRuntime``: each server a container.

A server is a container named ``dbprov-<id>`` on a volume ``dbprov-<id>-data``,
published on the bind address, attached to the installation's network (no
traffic between its containers), and labelled ``io.dbprov.*`` so that this
installation finds, and sweeps, only its own.

What its data is made of is the storage backend's (``storage.overlay``: an
overlay on a golden volume, so a new server skips initdb; ``storage.btrfs``:
subvolumes of a pool, whose copies are thin). On data that
begins initialised, the server's superuser gets its own password in
single-user mode before the server first listens; nobody ever knew the
golden one. A server's TLS certificate and key come in its environment, and
an entry of its own writes them into its container's files at every start
(see ``entry``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import docker
import docker.errors

from ..errors import EngineError, EngineRefused, ImageMissing, NotFound, RuntimeUnavailable
from ..storage.btrfs import BtrfsStorage
from ..storage.overlay import OverlayStorage
from ..storage.pool import Pool
from ..storage.protocol import StorageBackend
from .engine import LABEL_JOB, PORT_TAKEN, Engine, translated
from .entry import carries_tls, first_start_entry, tls_entry
from .protocol import (
    ABSENT,
    CRASHED,
    LABEL_DATABASE_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    PGDATA,
    RUNNING,
    STOPPED,
    Endpoint,
    JobResult,
    ServerInfo,
    ServerSpec,
    StorageReport,
    container_name,
    labels_for,
    volume_name,
)
from .watcher import Liveness

log = logging.getLogger(__name__)


class DockerRuntime:
    """A ``ServerRuntime`` on the engine named by the usual ``DOCKER_*`` variables."""

    def __init__(
        self,
        instance: str,
        network: str,
        bind_address: str,
        probe_host: str,
        pull: bool = True,
        golden: bool = True,
        client: "docker.DockerClient | None" = None,
        storage: StorageBackend | None = None,
        pool: "Callable[[], tuple[Pool | None, str]] | None" = None,
    ) -> None:
        self.instance = instance
        self.network = network
        self.bind_address = bind_address
        # An engine elsewhere (DOCKER_HOST names another machine) publishes there.
        self.publishes_here = _local_engine(os.environ.get("DOCKER_HOST", ""))
        # Where the service itself connects to published ports.
        self.probe_host = probe_host
        self.engine = Engine(pull=pull, client=client)
        # What the servers' data is made of: subvolumes of the pool that
        # ``pool`` opens (on first use: it may make and mount one) if it gives
        # one, else volumes of the engine's own, with why; ``golden``: whether
        # new servers start on a golden copy rather than running initdb.
        self._storage = storage
        self._pool = pool
        self._golden = golden
        self._storage_lock = threading.Lock()
        self._labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: instance}
        # Found or made on the first server; one lookup per process.
        self._network_id: str | None = None
        self._network_lock = threading.Lock()
        self._liveness = Liveness(self.engine, instance)

    @property
    def storage(self) -> StorageBackend:
        with self._storage_lock:
            if self._storage is None:
                pool, reason = self._pool() if self._pool else (None, "no pool was asked for")
                if pool is None:
                    self._storage = OverlayStorage(self.engine, self.instance, self._golden, reason)
                else:
                    self._storage = BtrfsStorage(self.engine, self.instance, pool, reason, self._golden)
            return self._storage

    @property
    def client(self) -> "docker.DockerClient":
        return self.engine.client

    def ping(self) -> None:
        with translated():
            self.client.ping()

    def has_image(self, image: str) -> bool:
        return self.engine.has_image(image)

    def pull_image(self, image: str, progress: Callable[[str], None] | None = None) -> None:
        self.engine.pull_image(image, progress)

    # -- servers ----------------------------------------------------------------

    def ensure_server(self, spec: ServerSpec) -> Endpoint:
        name = container_name(spec.database_id)
        labels = labels_for(self.instance, spec.database_id)
        with translated():
            retried = False
            while True:
                attrs = self.engine.container(name)
                if attrs is None:
                    container_id = self._create(spec, labels)
                    tls = spec.tls is not None
                elif (attrs.get("State") or {}).get("Running"):
                    return Endpoint(self.probe_host, spec.port, _serves_tls(attrs))
                else:
                    container_id, tls = attrs["Id"], _serves_tls(attrs)
                try:
                    self.client.api.start(container_id)
                    return Endpoint(self.probe_host, spec.port, tls)
                except docker.errors.APIError as exc:
                    # Leave nothing behind: the data is on the volume.
                    self.engine.remove_container(container_id)
                    text = str(exc.explanation or exc).lower()
                    if retried or any(phrase in text for phrase in PORT_TAKEN):
                        raise
                    # The engine reports a network removed behind our back only
                    # at start: look it up (or make it) again, and the container anew.
                    with self._network_lock:
                        self._network_id = None
                    retried = True

    def _create(self, spec: ServerSpec, labels: dict[str, str]) -> str:
        try:
            base = self.client.api.inspect_image(spec.image)
        except docker.errors.ImageNotFound:
            if not self.engine.pull:
                raise ImageMissing(
                    f"the engine has no image {spec.image} and pulling is off (DBPROV_PULL_IMAGES)",
                    image=spec.image,
                ) from None
            log.info("pulling image %s", spec.image)
            self.pull_image(spec.image)
            base = self.client.api.inspect_image(spec.image)
        data = self.storage.prepare(spec, base)
        kwargs = dict(
            name=container_name(spec.database_id),
            command=list(spec.command),
            environment=spec.environment,
            labels=labels,
            ports={"5432/tcp": (self.bind_address, spec.port)},
            volumes=data.volumes,
            restart_policy={"Name": "unless-stopped"},
            network=self._network(),
            mem_limit=spec.memory_limit,
            nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
            pids_limit=spec.pids_limit,
            security_opt=["no-new-privileges:true"],
            detach=True,
        )
        entrypoint = list(base["Config"].get("Entrypoint") or [])
        if data.initialised:
            entrypoint, environment = first_start_entry(
                spec.superuser, spec.superuser_password, data.pgdata, entrypoint, spec.environment
            )
            kwargs.update(
                # The data's owner from the start: single-user mode refuses root,
                # and the entrypoint has nothing to change hands on a copy.
                user="postgres",
                environment=environment,
                # The volumes the image declares, unused now: a tmpfs rather than
                # an anonymous volume each.
                tmpfs={path: "size=1m" for path in (base["Config"].get("Volumes") or {})},
            )
        if spec.tls is not None:
            entrypoint, kwargs["command"], kwargs["environment"] = tls_entry(
                spec.tls(()), entrypoint, kwargs["command"], kwargs["environment"]
            )
        if data.initialised or spec.tls is not None:
            # Else none is given: the engine keeps the image's own.
            kwargs["entrypoint"] = entrypoint
        container_id = self.client.containers.create(data.image, **kwargs).id
        self.storage.confirm(data, container_id)
        return container_id

    def stop_server(self, database_id: str) -> None:
        with translated():
            try:
                # The postgres images stop on SIGINT (a fast shutdown) within
                # the timeout; after it the engine kills the server.
                self.client.api.stop(container_name(database_id), timeout=30)
            except docker.errors.NotFound:
                pass  # no server, nothing running

    def start_server(self, database_id: str) -> None:
        with translated():
            try:
                self.client.api.start(container_name(database_id))
            except docker.errors.NotFound:
                raise NotFound(f"database {database_id} has no server to start") from None

    def remove_server(self, database_id: str, keep_data: bool = False) -> None:
        with translated():
            jobs = self.client.api.containers(
                all=True, filters={"label": [f"{LABEL_DATABASE_ID}={database_id}", LABEL_JOB]}
            )
            for job in jobs:
                self.engine.remove_container(job["Id"])
            self.engine.remove_container(container_name(database_id))
            if not keep_data:
                self.storage.remove(database_id)

    def inspect_server(self, database_id: str) -> ServerInfo | None:
        volume = volume_name(database_id)
        with translated():
            attrs = self.engine.container(container_name(database_id))
            if attrs is None:
                has_data = self.storage.has_data(database_id)
                return ServerInfo(database_id, ABSENT, has_data, "no container") if has_data else None
        # A volume a container mounts cannot be removed: no second question to
        # the engine (a warm pool's claim asks this of its member).
        has_data = any(m.get("Name") == volume for m in attrs.get("Mounts") or [])
        state = attrs.get("State") or {}
        return _server_info(
            database_id,
            status=state.get("Status", "unknown"),
            exit_code=state.get("ExitCode"),
            restarts=attrs.get("RestartCount") or 0,
            has_data=has_data,
        )

    def runs_unbroken(self, database_id: str) -> bool | None:
        return self._liveness.runs_unbroken(database_id)

    def list_servers(self) -> list[ServerInfo]:
        filters = {"label": [f"{k}={v}" for k, v in self._labels.items()]}
        with translated():
            containers = self.client.api.containers(all=True, filters=filters)
            with_data = self.storage.with_data()
        servers = {}
        for item in containers:
            labels = item.get("Labels") or {}
            database_id = labels.get(LABEL_DATABASE_ID)
            if database_id is None or LABEL_JOB in labels:
                continue
            servers[database_id] = _server_info(
                database_id,
                status=item.get("State", "unknown"),
                # The listing has no exit code field, only this text: "Exited (1) 3 minutes ago".
                exit_code=_exit_code(item.get("Status", "")),
                restarts=0,
                has_data=database_id in with_data,
            )
        for database_id in with_data - set(servers):
            servers[database_id] = ServerInfo(database_id, ABSENT, True, "no container")
        return list(servers.values())

    def server_logs(self, database_id: str, tail: int = 30) -> str:
        try:
            with translated():
                raw = self.client.api.logs(container_name(database_id), tail=tail)
        except (EngineRefused, EngineError, RuntimeUnavailable):
            return "(logs unavailable)"
        return raw.decode("utf-8", errors="replace")

    def endpoint(self, database_id: str) -> Endpoint | None:
        with translated():
            attrs = self.engine.container(container_name(database_id))
        bindings = ((attrs or {}).get("HostConfig") or {}).get("PortBindings") or {}
        published = bindings.get("5432/tcp") or []
        if not published or not published[0].get("HostPort"):
            return None
        return Endpoint(self.probe_host, int(published[0]["HostPort"]), _serves_tls(attrs))

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
            container = self._beside(database_id, command, environment)
            return self.engine.run(container, command, input_file, timeout)

    def stream_job(
        self, database_id: str, command: list[str], environment: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        with translated():
            container = self._beside(database_id, command, environment)
        yield from self.engine.stream(container, command)

    def _beside(self, database_id: str, command: list[str], environment: dict[str, str] | None):
        """A job container from the server's image, in its network namespace, with
        its volumes where it has them and its $PGDATA."""
        server = self.engine.container(container_name(database_id))
        if server is None:
            raise NotFound(f"database {database_id} has no server")
        pgdata = next(
            (item.split("=", 1)[1] for item in server["Config"].get("Env") or [] if item.startswith("PGDATA=")),
            PGDATA,
        )
        return self.engine.job_container(
            database_id,
            labels_for(self.instance, database_id),
            server["Config"]["Image"],
            command,
            {
                mount["Name"]: {"bind": mount["Destination"], "mode": "rw" if mount.get("RW") else "ro"}
                for mount in server.get("Mounts") or []
                if mount.get("Type") == "volume"
            },
            network_mode=f"container:{container_name(database_id)}",
            environment={"PGDATA": pgdata, **(environment or {})},
        )

    def copy_data(self, source_id: str, target_id: str, image: str) -> int:
        with translated():
            return self.storage.copy(source_id, target_id, image)

    def copies_live(self, database_id: str) -> bool:
        with translated():
            return self.storage.copies_live(database_id)

    def storage_report(self) -> StorageReport:
        return self.storage.report()

    def prune_caches(self) -> list[str]:
        with translated():
            return self.storage.prune_caches()

    # -- the network ---------------------------------------------------------------

    def _network(self) -> str:
        """The installation's bridge network, whose containers cannot reach each other."""
        with self._network_lock:
            if self._network_id is None:
                self._network_id = self._ensure_network()
            return self._network_id

    def _ensure_network(self) -> str:
        found = self._networks()
        if not found:
            self.client.api.create_network(
                self.network,
                driver="bridge",
                labels=self._labels,
                # No traffic between containers on this bridge: one tenant's
                # server cannot reach another's. Published ports still work.
                options={"com.docker.network.bridge.enable_icc": "false"},
                check_duplicate=True,
            )
            found = self._networks()
        # The engine does not refuse a second network of the same name, so
        # processes starting together may each make one: all of them keep
        # the oldest and drop the rest.
        keep, *extra = sorted(found, key=lambda n: (n["Created"], n["Id"]))
        for network in extra:
            try:
                self.client.api.remove_network(network["Id"])
            except docker.errors.APIError:
                pass  # in use, or already gone: the next caller tries again
        return keep["Id"]

    def _networks(self) -> list[dict]:
        # The engine's name filter matches substrings.
        return [n for n in self.client.api.networks(names=[self.network]) if n["Name"] == self.network]


def _serves_tls(attrs: dict) -> bool:
    """Whether a server's container was made with a certificate."""
    return carries_tls((attrs.get("Config") or {}).get("Env"))


def _server_info(
    database_id: str, status: str, exit_code: int | None, restarts: int, has_data: bool
) -> ServerInfo:
    """Docker's container state as a server state."""
    reason = status
    if exit_code and status in ("exited", "dead", "restarting"):
        reason += f" (exit code {exit_code})"
    if restarts:
        reason += f" after {restarts} restart(s)"
    if status == "running":
        state = RUNNING
    elif status in ("created", "paused") or (status == "exited" and exit_code == 0):
        # Never started, or shut down cleanly (a stop, or the engine's own restart).
        state = STOPPED
    else:
        # Exited with an error, dead, or being revived by the restart policy.
        state = CRASHED
    return ServerInfo(database_id, state, has_data, reason, restarts)


def _exit_code(status_text: str) -> int | None:
    if status_text.startswith("Exited ("):
        return int(status_text[len("Exited ("):].split(")", 1)[0])
    return None


def _local_engine(docker_host: str) -> bool:
    """Whether DOCKER_HOST (empty: the default socket) names an engine on this machine."""
    if not docker_host or docker_host.startswith(("unix://", "npipe://")):
        return True
    host = urlsplit(docker_host).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1")
