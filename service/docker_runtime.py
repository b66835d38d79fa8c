"""The Docker engine behind ``ContainerRuntime``: the only module that imports ``docker``."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import docker
import docker.errors
import requests.exceptions

from .errors import ContainerRuntimeError, PortInUse, RuntimeUnavailable
from .runtime import PGDATA, ContainerInfo, ContainerSpec, VolumeInfo

log = logging.getLogger(__name__)

# Docker reports a taken host port only in the text of a 500 error; these are
# the phrasings of the engine's port allocator and of the kernel's bind().
_PORT_TAKEN = ("port is already allocated", "address already in use")


@contextmanager
def _translated() -> Iterator[None]:
    """Turn docker-py and transport errors into the project's own."""
    try:
        yield
    except docker.errors.APIError as exc:
        text = str(exc.explanation or exc)
        if any(phrase in text.lower() for phrase in _PORT_TAKEN):
            raise PortInUse(text) from exc
        raise ContainerRuntimeError(f"Docker engine refused: {text}") from exc
    except (docker.errors.DockerException, requests.exceptions.ConnectionError) as exc:
        raise RuntimeUnavailable(f"Docker engine unreachable: {exc}") from exc


class DockerRuntime:
    """A ``ContainerRuntime`` on the engine named by the usual ``DOCKER_*`` variables."""

    def __init__(self, client: "docker.DockerClient | None" = None) -> None:
        self._client = client

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

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        with _translated():
            try:
                self.client.volumes.get(name)
            except docker.errors.NotFound:
                self.client.volumes.create(name=name, labels=labels)

    def ensure_network(self, name: str, labels: dict[str, str]) -> str:
        with _translated():
            found = self._networks(name)
            if not found:
                self.client.api.create_network(
                    name,
                    driver="bridge",
                    labels=labels,
                    # No traffic between containers on this bridge: one tenant's
                    # server cannot reach another's. Published ports still work.
                    options={"com.docker.network.bridge.enable_icc": "false"},
                    check_duplicate=True,
                )
                found = self._networks(name)
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

    def _networks(self, name: str) -> list[dict]:
        # The engine's name filter matches substrings.
        return [n for n in self.client.api.networks(names=[name]) if n["Name"] == name]

    def create_container(self, spec: ContainerSpec) -> str:
        kwargs = dict(
            name=spec.name,
            command=spec.command,
            environment=spec.environment,
            labels=spec.labels,
            ports={"5432/tcp": (spec.host_ip, spec.host_port)},
            volumes={spec.volume: {"bind": PGDATA, "mode": "rw"}},
            restart_policy={"Name": "unless-stopped"},
            network=spec.network,
            mem_limit=spec.memory_limit,
            pids_limit=spec.pids_limit,
            security_opt=["no-new-privileges:true"],
            detach=True,
        )
        with _translated():
            try:
                container = self.client.containers.create(spec.image, **kwargs)
            except docker.errors.ImageNotFound:
                log.info("pulling image %s", spec.image)
                self.client.images.pull(spec.image)
                container = self.client.containers.create(spec.image, **kwargs)
        return container.id

    def get_container(self, name_or_id: str) -> ContainerInfo | None:
        with _translated():
            try:
                container = self.client.containers.get(name_or_id)
            except docker.errors.NotFound:
                return None
        return _info(container.attrs)

    def start_container(self, container_id: str) -> None:
        with _translated():
            self.client.api.start(container_id)

    def container_logs(self, container_id: str, tail: int = 30) -> str:
        try:
            with _translated():
                raw = self.client.api.logs(container_id, tail=tail)
        except ContainerRuntimeError:
            return "(logs unavailable)"
        return raw.decode("utf-8", errors="replace")

    def remove_container(self, name_or_id: str) -> None:
        with _translated():
            try:
                # v=True: anonymous volumes an image declares go with it.
                self.client.api.remove_container(name_or_id, force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                # 409: removal already in progress, which is what we want.
                if exc.status_code != 409:
                    raise

    def remove_volume(self, name: str) -> None:
        with _translated():
            try:
                self.client.api.remove_volume(name)
            except docker.errors.NotFound:
                pass

    def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        with _translated():
            found = self.client.api.containers(all=True, filters=filters)
        return [_summary_info(item) for item in found]

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        with _translated():
            found = self.client.api.volumes(filters=filters).get("Volumes") or []
        return [VolumeInfo(name=v["Name"], labels=v.get("Labels") or {}) for v in found]


def _info(attrs: dict) -> ContainerInfo:
    state = attrs.get("State") or {}
    return ContainerInfo(
        id=attrs["Id"],
        name=attrs.get("Name", "").lstrip("/"),
        state=state.get("Status", "unknown"),
        exit_code=state.get("ExitCode"),
        restart_count=attrs.get("RestartCount") or 0,
        labels=(attrs.get("Config") or {}).get("Labels") or {},
    )


def _summary_info(item: dict) -> ContainerInfo:
    # The list endpoint gives no exit code; callers that need one ask get_container.
    names = item.get("Names") or [""]
    return ContainerInfo(
        id=item["Id"],
        name=names[0].lstrip("/"),
        state=item.get("State", "unknown"),
        labels=item.get("Labels") or {},
    )
