"""An in-memory ServerRuntime and server admin for the fast tests, with failure knobs."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

import psycopg

from service.errors import ImageMissing, NodeUnavailable, NotFound, PortInUse, RuntimeUnavailable
from service.postgres.admin import Login, ServerDatabase
from service.runtime.protocol import (
    ABSENT,
    CRASHED,
    RUNNING,
    STOPPED,
    UNREACHABLE,
    Endpoint,
    JobResult,
    ServerInfo,
    ServerSpec,
    StorageReport,
)

# Why a server whose machine is away cannot be reached, as the Swarm runtime words it.
AWAY = "node fake-2 (f2) is down"


@dataclass
class FakeServer:
    spec: ServerSpec
    state: str = STOPPED
    reason: str = "created"
    # Bumped each time the server is made anew, so tests can tell.
    generation: int = 0
    logs: str = ""


@dataclass
class FakeRuntime:
    """Servers and their data as dicts; knobs to make the engine misbehave."""

    servers: dict[str, FakeServer] = field(default_factory=dict)
    # Its ports are not real: a sleeping database is stopped, as on a Swarm.
    publishes_here: bool = False
    # Ids whose data exists; value: what the data holds (copy_data copies it).
    data: dict[str, str] = field(default_factory=dict)
    # Host ports something outside dbprov holds: starting a server on one fails.
    foreign_ports: set[int] = field(default_factory=set)
    # Images whose servers exit at once, with this log.
    crashing_images: dict[str, str] = field(default_factory=dict)
    # Images the engine lacks and cannot pull.
    missing_images: set[str] = field(default_factory=set)
    reachable: bool = True
    # Whether copy_data takes a running server's data (a pool's snapshots).
    live_copies: bool = False
    # Bytes free in the fake's storage pool; None: no pool.
    pool_free: int | None = None
    # Ids whose server and data are on a machine that is away (a Swarm node
    # down): reported UNREACHABLE, and whatever needs that machine waits for it.
    away: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    # Jobs run: (database id, command, environment, input), and what the next ones answer.
    jobs: list[tuple] = field(default_factory=list)
    # What the next jobs end with: a result, or an error they raise.
    job_results: list[JobResult | Exception] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._made = 0

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if not self.reachable:
            raise RuntimeUnavailable("Docker engine unreachable: fake is down")

    def _require_machine(self, database_id: str) -> None:
        if database_id in self.away:
            raise NodeUnavailable(f"{AWAY}: database {database_id}'s data is on it")

    def ping(self) -> None:
        self._check("ping")

    def has_image(self, image: str) -> bool:
        self._check("has_image")
        return image not in self.missing_images

    def pull_image(self, image: str, progress=None) -> None:
        self._check("pull_image")
        if image in self.missing_images:
            raise ImageMissing(f"cannot pull {image}: no registry answers", image=image)
        if progress is not None:
            progress(f"{image}: up to date")

    def ensure_server(self, spec: ServerSpec) -> Endpoint:
        self._check("ensure_server")
        self._require_machine(spec.database_id)
        if spec.image in self.missing_images:
            self.pull_image(spec.image)  # which fails, as the engine's would
        with self._lock:
            self.data.setdefault(spec.database_id, "")
            server = self.servers.get(spec.database_id)
            if server is None:
                self._made += 1
                server = self.servers[spec.database_id] = FakeServer(spec, generation=self._made)
                self.calls.append("create")
        if server.state == RUNNING:
            return Endpoint("127.0.0.1", server.spec.port, server.spec.tls is not None)
        if spec.port in self.foreign_ports:
            self.servers.pop(spec.database_id, None)
            raise PortInUse(f"Bind for 127.0.0.1:{spec.port} failed: port is already allocated")
        self._start(server)
        return Endpoint("127.0.0.1", spec.port, server.spec.tls is not None)

    def _start(self, server: FakeServer) -> None:
        self.calls.append("start")
        if server.spec.image in self.crashing_images:
            server.logs = self.crashing_images[server.spec.image]
            server.state, server.reason = CRASHED, "exited (exit code 1)"
        else:
            server.state, server.reason = RUNNING, "running"

    def stop_server(self, database_id: str) -> None:
        self._check("stop_server")
        server = self.servers.get(database_id)
        if server is not None:
            server.state, server.reason = STOPPED, "exited"

    def start_server(self, database_id: str) -> None:
        self._check("start_server")
        self._require_machine(database_id)
        server = self.servers.get(database_id)
        if server is None:
            raise NotFound(f"database {database_id} has no server to start")
        self._start(server)

    def remove_server(self, database_id: str, keep_data: bool = False) -> None:
        self._check("remove_server")
        with self._lock:
            self.servers.pop(database_id, None)
        if not keep_data:
            # As on Swarm: the server goes at once, its data only with its machine there.
            self._require_machine(database_id)
            with self._lock:
                self.data.pop(database_id, None)

    def inspect_server(self, database_id: str) -> ServerInfo | None:
        self._check("inspect_server")
        return self._info(database_id)

    def _info(self, database_id: str) -> ServerInfo | None:
        server = self.servers.get(database_id)
        has_data = database_id in self.data
        if database_id in self.away and (server is not None or has_data):
            return ServerInfo(database_id, UNREACHABLE, has_data, AWAY)
        if server is None:
            return ServerInfo(database_id, ABSENT, True, "no container") if has_data else None
        return ServerInfo(database_id, server.state, has_data, server.reason)

    def runs_unbroken(self, database_id: str) -> bool | None:
        # Not followed: claims ask inspect_server, whose failures the tests set.
        return None

    def list_servers(self) -> list[ServerInfo]:
        self._check("list_servers")
        ids = set(self.servers) | set(self.data)
        # One question, as an engine's listing is (the benchmark lists 10,000).
        return [info for info in map(self._info, sorted(ids)) if info is not None]

    def server_logs(self, database_id: str, tail: int = 30) -> str:
        server = self.servers.get(database_id)
        return server.logs if server else "(no server)"

    def run_job(self, database_id, command, environment=None, input_file=None, timeout=300.0) -> JobResult:
        self._check("run_job")
        if database_id not in self.servers:
            raise NotFound(f"database {database_id} has no server")
        self.jobs.append((database_id, list(command), dict(environment or {}),
                          input_file.read_bytes() if input_file else None))
        result = self.job_results.pop(0) if self.job_results else JobResult(0, "")
        if isinstance(result, Exception):
            raise result
        return result

    def stream_job(self, database_id, command, environment=None):
        self._check("stream_job")
        if database_id not in self.servers:
            raise NotFound(f"database {database_id} has no server")
        self.jobs.append((database_id, list(command), dict(environment or {}), None))
        # What the server's data holds, as a "dump".
        yield from (self.data.get(database_id, "").encode()[i:i + 4] for i in range(0, len(self.data.get(database_id, "")), 4))

    def copy_data(self, source_id: str, target_id: str, image: str) -> int:
        self._check("copy_data")
        self._require_machine(source_id)
        if source_id not in self.data:
            raise NotFound(f"database {source_id} has no data")
        self.data[target_id] = self.data[source_id]
        return len(self.data[target_id])

    def copies_live(self, database_id: str) -> bool:
        self._check("copies_live")
        return self.live_copies

    def storage_report(self) -> StorageReport:
        if self.pool_free is not None:
            return StorageReport("btrfs", "the fake's pool", "/pool", self.pool_free, 2**36)
        return StorageReport("btrfs" if self.live_copies else "copy", "the fake's")

    def prune_caches(self) -> list[str]:
        self._check("prune_caches")
        return []

    def endpoint(self, database_id: str) -> Endpoint | None:
        self._check("endpoint")
        server = self.servers.get(database_id)
        return Endpoint("127.0.0.1", server.spec.port, server.spec.tls is not None) if server else None

    # -- helpers for tests ----------------------------------------------

    def set_state(self, database_id: str, state: str) -> None:
        self.servers[database_id].state = state


@dataclass
class FakePostgres:
    """The SQL side of the fake: roles and passwords of the fake runtime's servers."""

    runtime: FakeRuntime
    # port -> {role: password}, beside each server's own superuser.
    roles: dict[int, dict[str, str]] = field(default_factory=dict)
    superusers: dict[int, set[str]] = field(default_factory=dict)
    # Servers that never finish starting.
    starting_up: bool = False
    # port -> database settings and extensions, as configure left them.
    settings: dict[int, dict[str, str]] = field(default_factory=dict)
    extensions: dict[int, list[str]] = field(default_factory=dict)
    # port -> clients connected, sessions ever had, and tables in the tenant's database.
    clients: dict[int, int] = field(default_factory=dict)
    sessions: dict[int, int] = field(default_factory=dict)
    relations: dict[int, int] = field(default_factory=dict)
    # Ports whose emptiness check fails as a server error would.
    failing_relations: set[int] = field(default_factory=set)
    # port -> the databases the tenant made beside its first.
    made: dict[int, set[str]] = field(default_factory=dict)
    checkpoints: int = 0

    def _server(self, port: int) -> dict[str, str]:
        for server in list(self.runtime.servers.values()):
            away = server.spec.database_id in self.runtime.away
            if server.spec.port == port and server.state == RUNNING and not away:
                known = {server.spec.superuser: server.spec.superuser_password}
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

    def configure(self, admin, tenant, parameters, extensions) -> None:
        self.check(admin)
        self.check(tenant)
        self.settings.setdefault(admin.port, {}).update(parameters)
        self.extensions.setdefault(admin.port, []).extend(extensions)

    def user_relations(self, tenant) -> int:
        self.check(tenant)
        if tenant.port in self.failing_relations:
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        return self.relations.get(tenant.port, 0)

    def databases(self, tenant) -> list[ServerDatabase]:
        self.check(dataclasses.replace(tenant, dbname="app"))
        names = {"app", *self.made.get(tenant.port, ())}
        return [ServerDatabase(name, tenant.user, 7_000_000) for name in sorted(names)]

    def create_database(self, tenant, name) -> None:
        self.check(tenant)
        self.made.setdefault(tenant.port, set()).add(name)

    def drop_database(self, tenant, name) -> None:
        self.check(tenant)
        self.made.get(tenant.port, set()).discard(name)

    def client_activity(self, admin) -> tuple[int, int]:
        self.check(admin)
        return self.clients.get(admin.port, 0), self.sessions.get(admin.port, 0)

    def checkpoint(self, admin: Login) -> None:
        self.check(admin)
        self.checkpoints += 1
