"""One Docker engine behind ``ServerRuntime``.

With ``swarm_runtime``, which builds on it, the only modules that import
``docker``; docker-py's errors become the project's here, in ``_translated``.

A server is a container named ``dbprov-<id>`` on a volume ``dbprov-<id>-data``,
published on the bind address, attached to the installation's network (no
traffic between its containers), and labelled ``io.dbprov.*`` so that this
installation finds, and sweeps, only its own.
"""

from __future__ import annotations

import logging
import secrets
import tarfile
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

import docker
import docker.errors
import requests.exceptions
from docker.utils import parse_repository_tag

from .errors import (
    EngineError,
    EngineRefused,
    ImageMissing,
    NotFound,
    PortInUse,
    RuntimeUnavailable,
)
from .runtime import (
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
    container_name,
    labels_for,
    volume_name,
)

log = logging.getLogger(__name__)

# Marks the one-off containers of run_job and copy_data, which are not servers.
LABEL_JOB = "io.dbprov.job"
# Docker reports a taken host port only in the text of a 500 error; these are
# the phrasings of the engine's port allocator and of the kernel's bind().
_PORT_TAKEN = ("port is already allocated", "address already in use")


@contextmanager
def _translated() -> Iterator[None]:
    """docker-py and transport errors as the project's own, classified."""
    try:
        yield
    except docker.errors.APIError as exc:
        text = str(exc.explanation or exc)
        if any(phrase in text.lower() for phrase in _PORT_TAKEN):
            raise PortInUse(text) from exc
        status = exc.status_code or 500
        # 409 is a state the engine is passing through (a removal in progress,
        # a volume still in use): worth another try, unlike other refusals.
        if 400 <= status < 500 and status != 409:
            raise EngineRefused(f"Docker engine refused: {text}") from exc
        raise EngineError(f"Docker engine error: {text}") from exc
    except (
        docker.errors.DockerException,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
    ) as exc:
        raise RuntimeUnavailable(f"Docker engine unreachable: {exc}") from exc


class DockerRuntime:
    """A ``ServerRuntime`` on the engine named by the usual ``DOCKER_*`` variables."""

    def __init__(
        self,
        instance: str,
        network: str,
        bind_address: str,
        probe_host: str,
        pull: bool = True,
        client: "docker.DockerClient | None" = None,
    ) -> None:
        self.instance = instance
        self.network = network
        self.bind_address = bind_address
        # Where the service itself connects to published ports.
        self.probe_host = probe_host
        self.pull = pull
        self._client = client
        self._labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: instance}
        # Found or made on the first server; one lookup per process.
        self._network_id: str | None = None
        self._network_lock = threading.Lock()

    @property
    def client(self) -> "docker.DockerClient":
        # Connect lazily: the service must start (and say so on /readyz) even
        # while the engine is down.
        if self._client is None:
            with _translated():
                self._client = docker.from_env(timeout=30)
        return self._client

    def ping(self) -> None:
        with _translated():
            self.client.ping()

    # -- images ---------------------------------------------------------------

    def has_image(self, image: str) -> bool:
        with _translated():
            try:
                self.client.api.inspect_image(image)
            except docker.errors.ImageNotFound:
                return False
        return True

    def pull_image(self, image: str, progress: Callable[[str], None] | None = None) -> None:
        repository, tag = parse_repository_tag(image)
        try:
            with _translated():
                for event in self.client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                    if "error" in event:
                        raise ImageMissing(f"cannot pull {image}: {event['error']}", image=image)
                    if progress is not None:
                        progress(" ".join(str(event[k]) for k in ("id", "status", "progress") if event.get(k)))
        except (EngineError, EngineRefused) as exc:
            # The registry is unreachable or does not know the image.
            raise ImageMissing(f"cannot pull {image}: {exc.detail}", image=image) from None

    # -- servers ----------------------------------------------------------------

    def ensure_server(self, spec: ServerSpec) -> Endpoint:
        name = container_name(spec.database_id)
        labels = labels_for(self.instance, spec.database_id)
        with _translated():
            self._ensure_volume(volume_name(spec.database_id), labels)
            retried = False
            while True:
                attrs = self._container(name)
                if attrs is None:
                    container_id = self._create(spec, labels)
                elif (attrs.get("State") or {}).get("Running"):
                    return Endpoint(self.probe_host, spec.port)
                else:
                    container_id = attrs["Id"]
                try:
                    self.client.api.start(container_id)
                    return Endpoint(self.probe_host, spec.port)
                except docker.errors.APIError as exc:
                    # Leave nothing behind: the data is on the volume.
                    self._remove_container(container_id)
                    text = str(exc.explanation or exc).lower()
                    if retried or any(phrase in text for phrase in _PORT_TAKEN):
                        raise
                    # The engine reports a network removed behind our back only
                    # at start: look it up (or make it) again, and the container anew.
                    with self._network_lock:
                        self._network_id = None
                    retried = True

    def _create(self, spec: ServerSpec, labels: dict[str, str]) -> str:
        kwargs = dict(
            name=container_name(spec.database_id),
            command=list(spec.command),
            environment=spec.environment,
            labels=labels,
            ports={"5432/tcp": (self.bind_address, spec.port)},
            volumes={volume_name(spec.database_id): {"bind": PGDATA, "mode": "rw"}},
            restart_policy={"Name": "unless-stopped"},
            network=self._network(),
            mem_limit=spec.memory_limit,
            nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
            pids_limit=spec.pids_limit,
            security_opt=["no-new-privileges:true"],
            detach=True,
        )
        try:
            return self.client.containers.create(spec.image, **kwargs).id
        except docker.errors.ImageNotFound:
            if not self.pull:
                raise ImageMissing(
                    f"the engine has no image {spec.image} and pulling is off (DBPROV_PULL_IMAGES)",
                    image=spec.image,
                ) from None
        log.info("pulling image %s", spec.image)
        self.pull_image(spec.image)
        return self.client.containers.create(spec.image, **kwargs).id

    def stop_server(self, database_id: str) -> None:
        with _translated():
            try:
                # The postgres images stop on SIGINT (a fast shutdown) within
                # the timeout; after it the engine kills the server.
                self.client.api.stop(container_name(database_id), timeout=30)
            except docker.errors.NotFound:
                pass  # no server, nothing running

    def start_server(self, database_id: str) -> None:
        with _translated():
            try:
                self.client.api.start(container_name(database_id))
            except docker.errors.NotFound:
                raise NotFound(f"database {database_id} has no server to start") from None

    def remove_server(self, database_id: str, keep_data: bool = False) -> None:
        with _translated():
            jobs = self.client.api.containers(
                all=True, filters={"label": [f"{LABEL_DATABASE_ID}={database_id}", LABEL_JOB]}
            )
            for job in jobs:
                self._remove_container(job["Id"])
            self._remove_container(container_name(database_id))
            if not keep_data:
                try:
                    self.client.api.remove_volume(volume_name(database_id))
                except docker.errors.NotFound:
                    pass

    def inspect_server(self, database_id: str) -> ServerInfo | None:
        with _translated():
            attrs = self._container(container_name(database_id))
            has_data = self._volume_exists(volume_name(database_id))
        if attrs is None:
            return ServerInfo(database_id, ABSENT, has_data, "no container") if has_data else None
        state = attrs.get("State") or {}
        return _server_info(
            database_id,
            status=state.get("Status", "unknown"),
            exit_code=state.get("ExitCode"),
            restarts=attrs.get("RestartCount") or 0,
            has_data=has_data,
        )

    def list_servers(self) -> list[ServerInfo]:
        filters = {"label": [f"{k}={v}" for k, v in self._labels.items()]}
        with _translated():
            containers = self.client.api.containers(all=True, filters=filters)
            volumes = self.client.api.volumes(filters=filters).get("Volumes") or []
        with_data = {(v.get("Labels") or {}).get(LABEL_DATABASE_ID) for v in volumes}
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
        for database_id in with_data - set(servers) - {None}:
            servers[database_id] = ServerInfo(database_id, ABSENT, True, "no container")
        return list(servers.values())

    def server_logs(self, database_id: str, tail: int = 30) -> str:
        try:
            with _translated():
                raw = self.client.api.logs(container_name(database_id), tail=tail)
        except (EngineRefused, EngineError, RuntimeUnavailable):
            return "(logs unavailable)"
        return raw.decode("utf-8", errors="replace")

    def endpoint(self, database_id: str) -> Endpoint | None:
        with _translated():
            attrs = self._container(container_name(database_id))
        bindings = ((attrs or {}).get("HostConfig") or {}).get("PortBindings") or {}
        published = bindings.get("5432/tcp") or []
        if not published or not published[0].get("HostPort"):
            return None
        return Endpoint(self.probe_host, int(published[0]["HostPort"]))

    # -- jobs -------------------------------------------------------------------

    def run_job(
        self,
        database_id: str,
        command: list[str],
        environment: dict[str, str] | None = None,
        input_file: Path | None = None,
        timeout: float = 300.0,
    ) -> JobResult:
        with _translated():
            container = self._beside(database_id, command, environment)
            try:
                if input_file is not None:
                    container.put_archive("/tmp", _tar_of(input_file, "input"))
                container.start()
                try:
                    status = container.wait(timeout=timeout)
                except requests.exceptions.ReadTimeout:
                    raise EngineError(f"job {command[0]} ran longer than {timeout:g} s") from None
                output = container.logs().decode("utf-8", errors="replace")
                return JobResult(exit_code=status.get("StatusCode", -1), output=output)
            finally:
                self._remove_container(container.id)

    def stream_job(
        self, database_id: str, command: list[str], environment: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        with _translated():
            container = self._beside(database_id, command, environment)
        output = None
        try:
            with _translated():
                # Attached before it starts, for every byte as written: the
                # engine's logs are kept as text and would mangle a binary stream.
                output = self.client.api.attach(container.id, stdout=True, stderr=False, stream=True, logs=True)
                container.start()
                for chunk in output:
                    yield chunk
                status = container.wait()
                if status.get("StatusCode", -1) != 0:
                    error = container.logs(stdout=False, stderr=True).decode("utf-8", errors="replace")
                    raise EngineError(f"{command[0]} failed: {error.strip()}")
        finally:
            if output is not None:
                # Both: closing the stream shuts its socket down, and the
                # response still holds the file object that owns it.
                output.close()
                output._response.close()
            with _translated():
                self._remove_container(container.id)

    def _beside(self, database_id: str, command: list[str], environment: dict[str, str] | None):
        """A job container from the server's image, on its data and in its network namespace."""
        return self._job_container(
            database_id,
            self._server_image(database_id),
            command,
            {volume_name(database_id): {"bind": PGDATA, "mode": "rw"}},
            network_mode=f"container:{container_name(database_id)}",
            environment=environment,
        )

    def copy_data(self, source_id: str, target_id: str, image: str) -> int:
        with _translated():
            if not self._volume_exists(volume_name(source_id)):
                raise NotFound(f"{source_id} has no data to copy")
            self._ensure_volume(volume_name(target_id), labels_for(self.instance, target_id))
            container = self._job_container(
                target_id,
                image,
                # -a keeps owners and modes: the server runs as its own user on
                # them. The size is the copy's, for the snapshot's record.
                ["sh", "-c", "cp -a /source/. /target/ && du -sb /target | cut -f1"],
                {
                    volume_name(source_id): {"bind": "/source", "mode": "ro"},
                    volume_name(target_id): {"bind": "/target", "mode": "rw"},
                },
                network_mode="none",
            )
            try:
                container.start()
                status = container.wait(timeout=3600)
                output = container.logs().decode("utf-8", errors="replace").strip()
            finally:
                self._remove_container(container.id)
        if status.get("StatusCode", -1) != 0 or not output.splitlines()[-1:][0].isdigit():
            raise EngineError(f"copying the data of {source_id} failed: {output}")
        return int(output.splitlines()[-1])

    def _job_container(
        self,
        database_id: str,
        image: str,
        command: list[str],
        volumes: dict,
        network_mode: str,
        environment: dict[str, str] | None = None,
    ):
        return self.client.containers.create(
            image,
            entrypoint=command[:1],
            command=command[1:],
            name=f"{container_name(database_id)}-job-{secrets.token_hex(3)}",
            labels={**labels_for(self.instance, database_id), LABEL_JOB: "true"},
            volumes=volumes,
            network_mode=network_mode,
            environment=environment or {},
            security_opt=["no-new-privileges:true"],
        )

    # -- engine objects ------------------------------------------------------------

    def _server_image(self, database_id: str) -> str:
        attrs = self._container(container_name(database_id))
        if attrs is None:
            raise NotFound(f"database {database_id} has no server")
        return attrs["Config"]["Image"]

    def _container(self, name_or_id: str) -> dict | None:
        try:
            return self.client.api.inspect_container(name_or_id)
        except docker.errors.NotFound:
            return None

    def _remove_container(self, name_or_id: str) -> None:
        try:
            # v=True: anonymous volumes an image declares go with it.
            self.client.api.remove_container(name_or_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # 409: removal already in progress, which is what we want.
            if exc.status_code != 409:
                raise

    def _volume_exists(self, name: str) -> bool:
        try:
            self.client.api.inspect_volume(name)
        except docker.errors.NotFound:
            return False
        return True

    def _ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        if not self._volume_exists(name):
            self.client.api.create_volume(name=name, labels=labels)

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


def _tar_of(path: Path, name: str) -> IO[bytes]:
    """``path`` as a one-file tar archive named ``name``, spooled to disk, for put_archive."""
    spool = tempfile.TemporaryFile()
    with tarfile.open(fileobj=spool, mode="w") as archive:
        info = archive.gettarinfo(str(path), arcname=name)
        # Readable by whatever user the job runs as.
        info.mode = 0o644
        with open(path, "rb") as handle:
            archive.addfile(info, handle)
    spool.seek(0)
    return spool


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
