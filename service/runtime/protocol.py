"""The runtime seam: what the domain asks of any engine that runs database servers.

It speaks of servers, their data and their endpoints, never of containers,
networks or volumes: ``runtime.docker`` maps it onto one Docker engine,
``runtime.swarm`` onto a Docker Swarm (docs/scale-out.md also maps it onto
Kubernetes). The fast tests use a fake with failure knobs (``tests/fakes.py``).

Every method raises only ``DbprovError``s: ``TransientError`` when trying again
later can help (the engine is unreachable, a host port is taken), a
``PermanentError`` when it cannot (the image is missing, the engine refused
the configuration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

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
class ServerCertificate:
    """A server's TLS certificate and its private key, both PEM."""

    certificate: str
    key: str = field(repr=False)


# Issues a server's certificate, with a key of its own, for the names clients
# reach every server by and ``hosts``, those only the runtime knows (the
# Swarm node's host it is placed on).
Issuer = Callable[[Sequence[str]], ServerCertificate]


@dataclass(frozen=True)
class ServerSpec:
    """What a database server is made of."""

    database_id: str
    image: str
    # The superuser its data is initialised with, and that superuser's password.
    superuser: str
    superuser_password: str = field(repr=False)
    # The host port clients reach it on.
    port: int
    # The image's command; for postgres images, "postgres" and its -c options.
    command: tuple[str, ...] = ("postgres",)
    memory_limit: str | None = None
    # CPUs the engine lets it use; None: no limit.
    cpus: float | None = None
    pids_limit: int | None = None
    # Called each time the server is made (not when one that exists is
    # started): its certificate and key live with that server alone, outside
    # its data, so a copy of the data never carries them. None: no TLS.
    tls: Issuer | None = field(default=None, repr=False, compare=False)
    # More of the image's environment than the superuser's.
    extra_environment: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def environment(self) -> dict[str, str]:
        """The image's environment: the postgres images initialise their data
        with the superuser these variables name."""
        return {
            **self.extra_environment,
            "POSTGRES_USER": self.superuser,
            "POSTGRES_PASSWORD": self.superuser_password,
        }


@dataclass(frozen=True)
class Endpoint:
    """Where the service itself reaches a server."""

    host: str
    port: int
    # Whether the server speaks TLS with a certificate ``ServerSpec.tls``
    # issued: one made before dbprov issued them does not, until it is made anew.
    tls: bool = False


# A server's states as the domain needs them.
RUNNING = "running"  # up (ready or still starting)
STOPPED = "stopped"  # stopped on purpose, or never started; its data is kept
CRASHED = "crashed"  # exited on its own, or restarted by the engine after a crash
ABSENT = "absent"    # only its data is left
# The machine holding the server and its data cannot be reached (a Swarm node
# down or removed); its data is presumably intact there, so the server is
# neither started nor made anew elsewhere. The Docker runtime never reports it.
UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class ServerInfo:
    database_id: str
    state: str
    # Whether its data (the volume) exists.
    has_data: bool = True
    # What the engine says, for people: "exited (exit code 1) after 2 restart(s)".
    reason: str = ""
    # How often the engine restarted it: a postgres server that initialises
    # normally never is, so during provisioning any restart means a crash.
    restarts: int = 0

    @property
    def running(self) -> bool:
        return self.state == RUNNING


@dataclass(frozen=True)
class StorageReport:
    """Which backend holds the data, and why: what /readyz tells an operator."""

    backend: str  # "btrfs" or "copy"
    reason: str
    # A pool's directory, its bytes free (counting the disk under a loop file) and in all.
    pool: str | None = None
    free_bytes: int | None = None
    size_bytes: int | None = None


@dataclass(frozen=True)
class JobResult:
    exit_code: int
    output: str


class ServerRuntime(Protocol):
    """The operations the domain needs of an engine; each step can be repeated.

    Removals treat "already gone" as success.
    """

    #: Whether servers publish their ports on this machine, where the service
    #: can hold a sleeping database's port itself (not so on a Swarm).
    publishes_here: bool

    def ping(self) -> None:
        """Raise ``RuntimeUnavailable`` unless the engine answers."""

    def has_image(self, image: str) -> bool: ...

    def pull_image(self, image: str, progress: Callable[[str], None] | None = None) -> None:
        """Pull ``image``, telling ``progress`` what happens; ``ImageMissing`` if it cannot."""

    def ensure_server(self, spec: ServerSpec) -> Endpoint:
        """The server exists with its data and runs; returns where it answers.

        ``PortInUse`` when something else holds ``spec.port`` (nothing is left
        behind: pick another port and call again).
        """

    def stop_server(self, database_id: str) -> None:
        """Stop it, keeping its data and its port."""

    def start_server(self, database_id: str) -> None:
        """Start a stopped server on its data."""

    def remove_server(self, database_id: str, keep_data: bool = False) -> None:
        """Remove the server and, unless ``keep_data``, its data."""

    def inspect_server(self, database_id: str) -> ServerInfo | None:
        """Its state, or None if neither it nor its data exists."""

    def runs_unbroken(self, database_id: str) -> bool | None:
        """Whether the server runs and has not stopped or crashed since the
        runtime began to follow it, from what the runtime follows on its own
        (the engine's events), without asking the engine; None when it cannot tell."""

    def list_servers(self) -> list[ServerInfo]:
        """Every server of this installation that has a process or data."""

    def server_logs(self, database_id: str, tail: int = 30) -> str:
        """The last lines of its log, or a note that there is none."""

    def run_job(
        self,
        database_id: str,
        command: list[str],
        environment: dict[str, str] | None = None,
        input_file: Path | None = None,
        timeout: float = 300.0,
    ) -> JobResult:
        """Run ``command`` once in a new process from the server's image, beside
        the server: its data mounted where the server has it (``$PGDATA``), and
        the server reachable on 127.0.0.1:5432. ``input_file`` is there as /tmp/input."""

    def stream_job(
        self, database_id: str, command: list[str], environment: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        """Like ``run_job``, yielding the command's standard output as it comes;
        ``EngineError`` at the end, with its standard error, if it failed."""

    def copy_data(self, source_id: str, target_id: str, image: str) -> int:
        """Make ``target_id``'s data a copy of ``source_id``'s (stop the source first
        for a consistent copy, unless ``copies_live``), with a job from ``image``; returns its size in
        bytes. The target has no server; ``ensure_server`` then starts one on
        the copy. A snapshot's data is stored like a server's, under its id."""

    def copies_live(self, database_id: str) -> bool:
        """Whether ``copy_data`` takes ``database_id``'s data as of one instant
        while its server runs: a crash-consistent copy, which PostgreSQL
        recovers on its first start, so the server need not stop for it."""

    def storage_report(self) -> StorageReport:
        """Which storage backend holds the data, and why."""

    def endpoint(self, database_id: str) -> Endpoint | None:
        """Where the server answers now, or None if it publishes no port."""

    def prune_caches(self) -> list[str]:
        """Remove what the runtime keeps to make servers faster (golden copies)
        that no server stands on now, for every installation on the engine
        (they share it); returns what went. The next server makes it again."""
