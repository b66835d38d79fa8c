"""The container runtime as the rest of the service sees it: a small Protocol.

``docker_runtime`` implements it against a Docker engine; the fast tests use a
fake. Nothing outside ``docker_runtime`` imports ``docker``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

LABEL_MANAGED = "io.dbprov.managed"
LABEL_DATABASE_ID = "io.dbprov.database-id"
LABEL_INSTANCE = "io.dbprov.instance"

# Where the postgres images (official and stand-in) keep PGDATA.
PGDATA = "/var/lib/postgresql/data"


def container_name(database_id: str) -> str:
    return f"dbprov-{database_id}"


def volume_name(database_id: str) -> str:
    return f"dbprov-{database_id}-data"


def labels_for(instance: str, database_id: str) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_DATABASE_ID: database_id, LABEL_INSTANCE: instance}


@dataclass(frozen=True)
class ContainerSpec:
    """What a tenant database's container is made of."""

    name: str
    image: str
    environment: dict[str, str]
    host_ip: str
    host_port: int
    volume: str
    labels: dict[str, str] = field(default_factory=dict)
    # The image's command; for postgres images, "postgres" and its -c options.
    command: list[str] | None = None
    # Id of the network to attach to (ensure_network's answer).
    network: str | None = None
    memory_limit: str | None = None
    pids_limit: int | None = None


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    # Docker's state: created, running, restarting, paused, exited, dead.
    state: str
    exit_code: int | None = None
    # How often the restart policy restarted it: a postgres container that
    # initialises normally is never restarted, so any restart means a crash.
    restart_count: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def database_id(self) -> str | None:
        return self.labels.get(LABEL_DATABASE_ID)

    @property
    def running(self) -> bool:
        return self.state in ("running", "restarting")

    @property
    def crashed(self) -> bool:
        return self.state in ("exited", "dead") or self.restart_count > 0

    def describe(self) -> str:
        text = self.state
        if self.exit_code and (self.state in ("exited", "dead") or self.restart_count):
            text += f" (exit code {self.exit_code})"
        if self.restart_count:
            text += f" after {self.restart_count} restart(s)"
        return text


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def database_id(self) -> str | None:
        return self.labels.get(LABEL_DATABASE_ID)


class ContainerRuntime(Protocol):
    """The operations the reconciler needs; each raises only ``DbprovError``s.

    Removals treat "already gone" as success, so every step can be repeated.
    """

    def ping(self) -> None: ...

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None: ...

    def ensure_network(self, name: str, labels: dict[str, str]) -> str:
        """A bridge network whose containers cannot reach each other; returns its id."""

    def create_container(self, spec: ContainerSpec) -> str: ...

    def get_container(self, name_or_id: str) -> ContainerInfo | None: ...

    def start_container(self, container_id: str) -> None: ...

    def container_logs(self, container_id: str, tail: int = 30) -> str: ...

    def remove_container(self, name_or_id: str) -> None: ...

    def remove_volume(self, name: str) -> None: ...

    def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]: ...

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]: ...
