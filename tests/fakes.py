"""An in-memory ContainerRuntime and readiness probe for the fast tests."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field, replace

import psycopg

from service.errors import ContainerRuntimeError, PortInUse, RuntimeUnavailable
from service.postgres import Login
from service.runtime import ContainerInfo, ContainerSpec, VolumeInfo


@dataclass
class FakeContainer:
    spec: ContainerSpec
    info: ContainerInfo
    logs: str = ""


@dataclass
class FakeRuntime:
    """Containers and volumes as dicts; knobs to make the engine misbehave."""

    containers: dict[str, FakeContainer] = field(default_factory=dict)
    volumes: dict[str, VolumeInfo] = field(default_factory=dict)
    networks: set[str] = field(default_factory=set)
    # Host ports something outside dbprov holds: starting a container on one fails.
    foreign_ports: set[int] = field(default_factory=set)
    # Images whose containers exit at once, with this log.
    crashing_images: dict[str, str] = field(default_factory=dict)
    reachable: bool = True
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if not self.reachable:
            raise RuntimeUnavailable("Docker engine unreachable: fake is down")

    def ping(self) -> None:
        self._check("ping")

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        self._check("ensure_volume")
        with self._lock:
            self.volumes.setdefault(name, VolumeInfo(name=name, labels=dict(labels)))

    def ensure_network(self, name: str, labels: dict[str, str]) -> str:
        self._check("ensure_network")
        self.networks.add(name)
        return f"net-{name}"

    def create_container(self, spec: ContainerSpec) -> str:
        self._check("create_container")
        with self._lock:
            if spec.name in self.containers:
                raise AssertionError(f"duplicate container name {spec.name}")
            cid = f"{next(self._ids):064x}"
            self.containers[spec.name] = FakeContainer(
                spec, ContainerInfo(id=cid, name=spec.name, state="created", labels=spec.labels)
            )
        return cid

    def _find(self, name_or_id: str) -> FakeContainer | None:
        for container in self.containers.values():
            if name_or_id in (container.info.id, container.info.name):
                return container
        return None

    def get_container(self, name_or_id: str) -> ContainerInfo | None:
        self._check("get_container")
        container = self._find(name_or_id)
        return container.info if container else None

    def start_container(self, container_id: str) -> None:
        self._check("start_container")
        container = self._find(container_id)
        assert container is not None, container_id
        if container.spec.network is not None and container.spec.network.removeprefix("net-") not in self.networks:
            raise ContainerRuntimeError(f"Docker engine refused: network {container.spec.network} not found")
        if container.spec.host_port in self.foreign_ports:
            raise PortInUse("Bind for 127.0.0.1:%d failed: port is already allocated" % container.spec.host_port)
        if container.spec.image in self.crashing_images:
            container.logs = self.crashing_images[container.spec.image]
            container.info = replace(container.info, state="exited", exit_code=1)
        else:
            container.info = replace(container.info, state="running", exit_code=0)

    def container_logs(self, container_id: str, tail: int = 30) -> str:
        container = self._find(container_id)
        return container.logs if container else ""

    def remove_container(self, name_or_id: str) -> None:
        self._check("remove_container")
        container = self._find(name_or_id)
        if container is not None:
            with self._lock:
                self.containers.pop(container.info.name, None)

    def remove_volume(self, name: str) -> None:
        self._check("remove_volume")
        with self._lock:
            self.volumes.pop(name, None)

    def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]:
        self._check("list_containers")
        return [
            c.info for c in list(self.containers.values())
            if labels.items() <= c.info.labels.items()
        ]

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        self._check("list_volumes")
        return [v for v in list(self.volumes.values()) if labels.items() <= v.labels.items()]

    # -- helpers for tests ----------------------------------------------

    def set_state(self, name: str, state: str) -> None:
        container = self.containers[name]
        container.info = replace(container.info, state=state)


@dataclass
class FakePostgres:
    """The SQL side of the fake: roles and passwords of the fake runtime's servers."""

    runtime: FakeRuntime
    # port -> {role: password}, beside each container's own superuser.
    roles: dict[int, dict[str, str]] = field(default_factory=dict)
    superusers: dict[int, set[str]] = field(default_factory=dict)
    # Servers that never finish starting.
    starting_up: bool = False

    def _server(self, port: int) -> dict[str, str]:
        for container in list(self.runtime.containers.values()):
            if container.spec.host_port == port and container.info.state == "running":
                env = container.spec.environment
                known = {env["POSTGRES_USER"]: env["POSTGRES_PASSWORD"]}
                return {**known, **self.roles.get(port, {})}
        raise psycopg.OperationalError("connection refused")

    def check(self, login: Login) -> None:
        if self.starting_up:
            raise psycopg.OperationalError("FATAL:  the database system is starting up")
        if self._server(login.port).get(login.user) != login.password:
            raise psycopg.OperationalError(f'password authentication failed for user "{login.user}"')

    def ensure_tenant_role(self, admin, username, password, database, superuser) -> None:
        self.check(admin)
        self.roles.setdefault(admin.port, {})[username] = password
        if superuser:
            self.superusers.setdefault(admin.port, set()).add(username)

    def set_password(self, admin, username, password) -> None:
        self.check(admin)
        assert username in self.roles.get(admin.port, {}), username
        self.roles[admin.port][username] = password
