"""Settings: read once from ``DBPROV_*`` environment variables into a frozen object.

Each setting is declared once, as a ``Settings`` field made by ``setting()``: its
variable, parser, default and meaning. ``Settings.from_env`` reads the variables
by those declarations, and ``settings_table_markdown`` prints the README's table.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import platformdirs
from cryptography.fernet import Fernet

from .errors import SettingsError

# A parser gets the variable's stripped text, or the declared default when the
# variable is unset or blank; it raises ValueError with what is wrong, never
# echoing a secret, and from_env adds the variable's name.


def _port_range(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", value)
    if not match:
        raise ValueError(f"expected FIRST-LAST, got {value!r}")
    first, last = int(match[1]), int(match[2])
    if not (1 <= first <= last <= 65535):
        raise ValueError(f"needs 1 <= FIRST <= LAST <= 65535, got {value!r}")
    return first, last


def _address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


def _images(value: str) -> dict[str, str]:
    images: dict[str, str] = {}
    for item in value.split(","):
        version, sep, image = (part.strip() for part in item.partition("="))
        if not sep or not re.fullmatch(r"\d+", version) or not image:
            raise ValueError(f"expected MAJOR=IMAGE[,MAJOR=IMAGE...], got {item.strip()!r}")
        images[version] = image
    return images


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be greater than zero, got {value!r}")
    return number


def _count(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) <= 0:
        raise ValueError(f"expected a whole number greater than zero, got {value!r}")
    return int(value)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _optional(value: str) -> str | None:
    return value or None


def _instance(value: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", value):
        raise ValueError("letters, digits, '_', '.', '-', at most 63")
    return value


def _memory(value: str) -> str:
    if not re.fullmatch(r"[0-9]+[bkmg]?", value.lower()):
        raise ValueError(f"expected a size such as 512m or 1g, got {value!r}")
    return value.lower()


def _keys(value: str) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in value.split(",") if key.strip())
    for position, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except ValueError:
            # Never echo the value: it is a secret.
            raise ValueError(
                f"key {position} is not a Fernet key (32 url-safe base64-encoded bytes); "
                "make one with `dbprov keys generate`"
            ) from None
    return keys


def _pool(value: str) -> int | dict[str, int]:
    """``N`` (every version) or ``MAJOR=N[,MAJOR=N...]``; from_env checks them against DBPROV_IMAGES."""
    if not value:
        return {}
    if re.fullmatch(r"[0-9]+", value):
        return int(value)
    sizes: dict[str, int] = {}
    for item in value.split(","):
        version, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not re.fullmatch(r"[0-9]+", size):
            raise ValueError(f"expected N or MAJOR=N[,...], got {item.strip()!r}")
        sizes[version] = int(size)
    return sizes


def _postgres_args(value: str) -> tuple[str, ...]:
    """``-c name=value`` options, as ``postgres`` takes them on its command line."""
    args = tuple(shlex.split(value))
    if len(args) % 2 or any(flag != "-c" for flag in args[::2]) or any(
        not re.fullmatch(r"[a-z_.]+=\S+", option) for option in args[1::2]
    ):
        raise ValueError(f"expected '-c name=value' options, got {value!r}")
    return args


def _optional_seconds(value: str) -> float | None:
    return _seconds(value) if value else None


def _names(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    for name in names:
        if not re.fullmatch(r"[a-z0-9_][a-z0-9_-]{0,62}", name):
            raise ValueError(f"expected comma-separated names, got {name!r}")
    return names


def _runtime(value: str) -> str:
    if value not in ("docker", "swarm"):
        raise ValueError(f"expected docker or swarm, got {value!r}")
    return value


def _storage(value: str) -> str:
    if value not in ("auto", "btrfs", "copy"):
        raise ValueError(f"expected auto, btrfs or copy, got {value!r}")
    return value


def size_in_bytes(size: str | None) -> int:
    """``512m``, ``1g`` and the like in bytes; 0 for no size (no limit)."""
    if not size:
        return 0
    match = re.fullmatch(r"([0-9]+)([bkmg]?)", size.strip().lower())
    if not match:
        raise ValueError(f"not a size: {size!r}")
    return int(match[1]) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2]]


def _size(value: str) -> int:
    return size_in_bytes(_memory(value))


def _label(value: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}", value):
        raise ValueError(f"expected a node label key, got {value!r}")
    return value


def _ratio(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be greater than zero, got {value!r}")
    return number


def _share(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a fraction, got {value!r}") from None
    if not 0 < number <= 1:
        raise ValueError(f"must be greater than 0 and at most 1, got {value!r}")
    return number


def _optional_count(value: str) -> int | None:
    return _count(value) if value else None


@dataclass(frozen=True)
class Plan:
    """A named size the operator offers: memory, CPUs and server settings that need a restart."""

    name: str
    memory: str
    cpus: float | None = None
    # postgres -c options, e.g. {"shared_buffers": "32MB", "max_connections": "20"}.
    settings: Mapping[str, str] = field(default_factory=dict)
    # Its databases' idle_stop unless a create names one; None: DBPROV_IDLE_STOP.
    idle_stop: float | None = None


def _plans(value: str) -> dict[str, Plan]:
    """JSON, or ``@path`` to a JSON file: {"small": {"memory": "256m", "cpus": 0.5, "settings": {...}}}."""
    if not value:
        return {}
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read {value[1:]}: {exc.strerror}") from None
    try:
        document = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("expected an object of plans by name")
    plans = {}
    for name, body in document.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name) or not isinstance(body, dict):
            raise ValueError(f"plan {name!r}: a lower-case name and an object")
        unknown = set(body) - {"memory", "cpus", "settings", "idle_stop"}
        if unknown:
            raise ValueError(f"plan {name!r}: unknown keys {', '.join(sorted(unknown))}")
        memory = _memory(str(body.get("memory", "1g")))
        cpus = body.get("cpus")
        if cpus is not None and (not isinstance(cpus, (int, float)) or isinstance(cpus, bool) or cpus <= 0):
            raise ValueError(f"plan {name!r}: cpus must be a number greater than zero")
        server_settings = body.get("settings") or {}
        if not isinstance(server_settings, dict) or not all(
            re.fullmatch(r"[a-z_.]+", k) and isinstance(v, (str, int, float)) and re.fullmatch(r"\S+", str(v))
            for k, v in server_settings.items()
        ):
            raise ValueError(f"plan {name!r}: settings must map setting names to single values")
        idle_stop = body.get("idle_stop")
        if idle_stop is not None and (
            not isinstance(idle_stop, (int, float)) or isinstance(idle_stop, bool) or idle_stop <= 0
        ):
            raise ValueError(f"plan {name!r}: idle_stop must be a number of seconds greater than zero")
        plans[name] = Plan(name, memory, cpus, {k: str(v) for k, v in server_settings.items()}, idle_stop)
    return plans


@dataclass(frozen=True)
class Declared:
    """How one ``DBPROV_*`` variable fills one ``Settings`` field."""

    variable: str
    parse: Callable[[str], Any]
    # As the variable would be written, or made from the fields declared before.
    default: str | Callable[[Mapping[str, Any]], str]
    doc: str
    # The default as the settings table shows it.
    shown: str


def setting(
    variable: str,
    parse: Callable[[str], Any],
    default: str | Callable[[Mapping[str, Any]], str],
    doc: str,
    *,
    shown: str | None = None,
    secret: bool = False,
) -> Any:
    """A ``Settings`` field read from ``variable``; ``shown`` describes a default that is no literal."""
    declared = Declared(variable, parse, default, doc, shown or f"`{default}`")
    # secret: settings get logged, and this one may carry credentials.
    options: dict[str, Any] = {"repr": not secret, "metadata": {"declared": declared}}
    if callable(default):
        # Made from other settings by from_env; whoever builds Settings directly passes it.
        return field(**options)
    # A fresh value per instance, as some are mutable mappings.
    return field(default_factory=lambda: parse(default), **options)


@dataclass(frozen=True)
class Settings:
    """Everything the service can be configured with; tests build it directly."""

    # Before database_url, whose default is made from it.
    data_dir: Path = setting(
        "DBPROV_DATA_DIR", Path, lambda _: platformdirs.user_data_dir("dbprov"),
        "where the embedded defaults keep their files",
        shown="the per-user data folder (`~/.local/share/dbprov` on Linux)",
    )
    database_url: str = setting(
        "DBPROV_DATABASE_URL", str, lambda values: f"sqlite:///{values['data_dir'] / 'dbprov.sqlite3'}",
        "the metadata store, as an SQLAlchemy URL "
        "(`postgresql+psycopg://user:pass@host/db` in production)",
        shown="`sqlite:///<DBPROV_DATA_DIR>/dbprov.sqlite3`", secret=True,
    )
    port_range: tuple[int, int] = setting(
        "DBPROV_PORT_RANGE", _port_range, "15432-16431", "host ports databases may be published on"
    )
    bind_address: str = setting(
        "DBPROV_BIND_ADDRESS", _address, "127.0.0.1", "host address the ports are published on"
    )
    public_host: str = setting(
        "DBPROV_PUBLIC_HOST", str, "localhost",
        "host name put in returned connection info (on Swarm: the node's address or public-host label instead)",
    )
    images: Mapping[str, str] = setting(
        "DBPROV_IMAGES", _images, "15=postgres:15,16=postgres:16,17=postgres:17",
        "supported major versions and their images",
    )
    default_version: str = setting(
        "DBPROV_DEFAULT_VERSION", str, "17", "version when a request names none"
    )
    ready_timeout: float = setting(
        "DBPROV_READY_TIMEOUT", _seconds, "60",
        "seconds a new container may take to accept the tenant's credentials",
    )
    request_timeout: float = setting(
        "DBPROV_REQUEST_TIMEOUT", _seconds, "90",
        "seconds `POST /databases` waits before answering 202 instead",
    )
    reconcile_interval: float = setting(
        "DBPROV_RECONCILE_INTERVAL", _seconds, "5",
        "seconds between reconcile passes (changes made through the API are acted on at once)",
    )
    # Containers and volumes of other dbprov installations on the same Docker
    # engine carry another instance label, and are never touched by this one.
    instance: str = setting(
        "DBPROV_INSTANCE", _instance, "default",
        "label value that tells this installation's containers from another's on the same engine",
    )
    probe_host: str | None = setting(
        "DBPROV_PROBE_HOST", _optional, "", "where dbprov itself connects to check readiness",
        shown="the bind address (`127.0.0.1` for a wildcard bind)",
    )
    max_parallel_provisioning: int = setting(
        "DBPROV_MAX_PARALLEL", _count, "8", "databases provisioned or removed at the same time"
    )
    secret_keys: tuple[str, ...] = setting(
        "DBPROV_SECRET_KEY", _keys, "", "comma-separated Fernet keys; the first encrypts",
        shown="a key file in `DBPROV_DATA_DIR` (SQLite only)", secret=True,
    )
    tenant_quota: int = setting(
        "DBPROV_TENANT_QUOTA", _count, "10",
        "live databases per tenant, unless the tenant has its own limit; its templates' warm "
        "clones and builds count",
    )
    tenant_port_share: float = setting(
        "DBPROV_TENANT_PORT_SHARE", _share, "0.5",
        "the largest part of `DBPROV_PORT_RANGE` one tenant's databases may hold, whatever its "
        "limit (admin tokens excepted)",
    )
    tenant_templates: int = setting(
        "DBPROV_TENANT_TEMPLATES", _count, "10", "templates a tenant may keep (not deleted)"
    )
    rate_limit: int = setting(
        "DBPROV_RATE_LIMIT", _count, "60",
        "requests that cost the service work (creates, snapshots, resets, restores, dumps, rotations, "
        "starts, stops) per token and minute, once its burst is spent; deletes and renewals are free",
    )
    rate_burst: int = setting(
        "DBPROV_RATE_BURST", _count, "60", "such requests one token may make at once",
    )
    allow_superuser: bool = setting(
        "DBPROV_ALLOW_SUPERUSER", _bool, "false",
        "whether a request may ask for a superuser tenant role",
    )
    memory_limit: str = setting(
        "DBPROV_MEMORY_LIMIT", _memory, "1g", "memory limit of each tenant container"
    )
    pids_limit: int = setting("DBPROV_PIDS_LIMIT", _count, "512", "process limit of each tenant container")
    postgres_args: tuple[str, ...] = setting(
        "DBPROV_POSTGRES_ARGS", _postgres_args, "", "`-c name=value` options for every tenant server",
        shown="none",
    )
    pool_sizes: Mapping[str, int] = setting(
        "DBPROV_POOL_SIZE", _pool, "",
        "warm servers kept per version: `N` for every version, or `MAJOR=N[,MAJOR=N]`",
        shown="off",
    )
    retry_budget: float = setting(
        "DBPROV_RETRY_BUDGET", _seconds, "600",
        "seconds the reconciler retries a transient error (engine or store unreachable, "
        "a port race) on one database before marking it failed",
    )
    pull_images: bool = setting(
        "DBPROV_PULL_IMAGES", _bool, "true",
        "whether a configured image the engine does not have is pulled",
    )
    golden_images: bool = setting(
        "DBPROV_GOLDEN_IMAGES", _bool, "true",
        "whether a new server starts from a data directory initialised once per image "
        "(a local `dbprov-golden` image and volume, each server's data an overlay on it) "
        "instead of running initdb; Docker runtime only",
    )
    storage: str = setting(
        "DBPROV_STORAGE", _storage, "auto",
        "what servers' data is made of: `btrfs` (subvolumes of a pool: snapshots of a running "
        "server and clones in constant time, no disk until written), `copy` (volumes of the "
        "engine's own, copied file by file, the server stopped for a snapshot), or `auto` "
        "(btrfs where a pool can be had, else copy; GET /readyz says which and why); Docker runtime only",
    )
    storage_pool: Path = setting(
        "DBPROV_STORAGE_POOL", Path, "/var/lib/dbprov/pool",
        "the btrfs directory of the pool; if it is not on btrfs, the service (as root, on the "
        "engine's host) makes a sparse loop file beside it (`<pool>.img`) and mounts it there",
    )
    storage_pool_size: int = setting(
        "DBPROV_STORAGE_POOL_SIZE", _size, "64g", "the size of a loop file the service makes for its pool"
    )
    storage_min_free: int = setting(
        "DBPROV_STORAGE_MIN_FREE", _size, "1g",
        "bytes of the pool kept free: a snapshot or a clone asked for with less is refused (507), or fails saying so",
    )
    default_ttl: float | None = setting(
        "DBPROV_DEFAULT_TTL", _optional_seconds, "",
        "seconds a database lives when its create names no expiry", shown="none: no expiry",
    )
    max_ttl: float | None = setting(
        "DBPROV_MAX_TTL", _optional_seconds, "",
        "the longest expiry a create or a renewal may set; with it, every database expires",
        shown="none",
    )
    idle_stop: float | None = setting(
        "DBPROV_IDLE_STOP", _optional_seconds, "",
        "seconds without client connections after which a database sleeps (its server stops; "
        "the next connection wakes it), unless its create or plan names another `idle_stop`",
        shown="off",
    )
    plans: Mapping[str, Plan] = setting(
        "DBPROV_PLANS", _plans, "",
        'named sizes, as JSON or `@file`: `{"small": {"memory": "256m", "cpus": 0.5, '
        '"settings": {"shared_buffers": "32MB"}, "idle_stop": 300}}`',
        shown="only `default` (`DBPROV_MEMORY_LIMIT`, no CPU limit)",
    )
    allowed_extensions: tuple[str, ...] = setting(
        "DBPROV_ALLOWED_EXTENSIONS", _names, "",
        "extensions a create may ask for beyond PostgreSQL's trusted ones", shown="none",
    )
    snapshot_quota: int = setting(
        "DBPROV_SNAPSHOT_QUOTA", _count, "10", "snapshots a tenant may keep (templates' own not counted)"
    )
    restore_max_bytes: int = setting(
        "DBPROV_RESTORE_MAX_BYTES", _count, "1073741824", "the largest archive `POST /databases/{id}/restore` takes"
    )
    restore_timeout: float = setting(
        "DBPROV_RESTORE_TIMEOUT", _seconds, "900",
        "seconds a restore's pg_restore may run before it is stopped and its transaction rolled back",
    )
    restores: int = setting(
        "DBPROV_RESTORES", _count, "2",
        "restores the service runs at once, each with its archive on the API host's disk",
    )
    tenant_transfers: int = setting(
        "DBPROV_TENANT_TRANSFERS", _count, "2", "dumps and restores one tenant may run at once",
    )
    idempotency_retention: float = setting(
        "DBPROV_IDEMPOTENCY_RETENTION", _seconds, "86400",
        "seconds an `Idempotency-Key` of a create is remembered",
    )
    event_retention: float = setting(
        "DBPROV_EVENT_RETENTION", _seconds, "2592000",
        "seconds a deleted database's events stay readable",
    )
    runtime: str = setting(
        "DBPROV_RUNTIME", _runtime, "docker",
        "where database servers run: `docker` (containers on one engine) or `swarm` (services on "
        "a Docker Swarm, through a manager's socket; see docs/scale-out.md)",
    )
    swarm_exclude_label: str = setting(
        "DBPROV_SWARM_EXCLUDE_LABEL", _label, "io.dbprov.exclude",
        "Swarm node label that keeps new databases off a node (any value but `false`)",
    )
    swarm_host_label: str = setting(
        "DBPROV_SWARM_HOST_LABEL", _label, "io.dbprov.public-host",
        "Swarm node label with the host name its databases are reached at; without it, the "
        "node's address",
    )
    swarm_overcommit: float = setting(
        "DBPROV_SWARM_OVERCOMMIT", _ratio, "1",
        "how many times its memory a Swarm node may promise to the memory limits of its databases",
    )
    swarm_max_per_node: int | None = setting(
        "DBPROV_SWARM_MAX_PER_NODE", _optional_count, "", "databases per Swarm node at most",
        shown="no limit",
    )
    swarm_helper_image: str = setting(
        "DBPROV_SWARM_HELPER_IMAGE", str, "python:3.11-slim",
        "an image with `python3` that removes a deleted database's volume on a Swarm node other "
        "than the manager dbprov uses; run by the digest (or image ID) of that manager's copy, "
        "pulled there if missing, never by tag",
    )

    @property
    def all_plans(self) -> dict[str, Plan]:
        """Every plan a create may name; ``default`` is today's size unless DBPROV_PLANS redefines it."""
        return {"default": Plan("default", self.memory_limit), **self.plans}

    @property
    def embedded(self) -> bool:
        """The single-machine default: a SQLite metadata store."""
        return self.database_url.startswith("sqlite")

    @property
    def network(self) -> str:
        """The Docker network tenant containers live on, isolated from each other."""
        return f"dbprov-{self.instance}"

    @property
    def effective_probe_host(self) -> str:
        """Where readiness checks connect: the bind address unless it is a wildcard."""
        if self.probe_host:
            return self.probe_host
        if self.bind_address in ("0.0.0.0", "::"):
            return "127.0.0.1"
        return self.bind_address

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Parse ``DBPROV_*`` variables; a bad value raises ``SettingsError`` naming it."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, declared in DECLARATIONS.items():
            default = declared.default(values) if callable(declared.default) else declared.default
            text = (env.get(declared.variable) or "").strip() or default
            try:
                values[name] = declared.parse(text)
            except ValueError as error:
                raise SettingsError(declared.variable, str(error)) from None
        _check_versions(values)
        return cls(**values)

    def ensure_data_dir(self) -> None:
        """Create the data folder, private to its owner, when the defaults use it."""
        if self.database_url.startswith("sqlite:///"):
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


# Field name to declaration, in the order declared.
DECLARATIONS: dict[str, Declared] = {item.name: item.metadata["declared"] for item in fields(Settings)}


def _check_versions(values: dict[str, Any]) -> None:
    """The checks across variables: every version named must be one of DBPROV_IMAGES."""
    images = values["images"]
    if values["default_version"] not in images:
        raise SettingsError(
            "DBPROV_DEFAULT_VERSION",
            f"{values['default_version']!r} is not among the versions of DBPROV_IMAGES "
            f"({', '.join(images)})",
        )
    pool = values["pool_sizes"]
    if isinstance(pool, int):
        pool = dict.fromkeys(images, pool)
    for version in pool:
        if version not in images:
            raise SettingsError("DBPROV_POOL_SIZE", f"version {version!r} is not in DBPROV_IMAGES")
    # Zero means no pool for that version.
    values["pool_sizes"] = {version: size for version, size in pool.items() if size > 0}


def settings_table_markdown() -> str:
    """The README's settings table, made from the declarations."""
    rows = [f"| `{d.variable}` | {d.shown} | {d.doc} |" for d in DECLARATIONS.values()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows]) + "\n"
