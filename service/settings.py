"""Settings: read once from ``DBPROV_*`` environment variables into a frozen object."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import platformdirs

from .crypto import is_valid_key
from .errors import SettingsError

DEFAULT_IMAGES = "15=postgres:15,16=postgres:16,17=postgres:17"


@dataclass(frozen=True)
class Settings:
    """Everything the service can be configured with; tests build it directly."""

    # repr=False: these two may carry credentials, and settings get logged.
    database_url: str = field(repr=False)
    data_dir: Path
    port_range: tuple[int, int] = (15432, 16431)
    bind_address: str = "127.0.0.1"
    public_host: str = "localhost"
    images: Mapping[str, str] = field(
        default_factory=lambda: {"15": "postgres:15", "16": "postgres:16", "17": "postgres:17"}
    )
    default_version: str = "17"
    ready_timeout: float = 60.0
    # How long POST /databases waits for readiness before answering 202.
    request_timeout: float = 90.0
    reconcile_interval: float = 5.0
    # Containers and volumes of other dbprov installations on the same Docker
    # engine carry another instance label, and are never touched by this one.
    instance: str = "default"
    # Host name or address the service itself uses to reach published ports.
    probe_host: str | None = None
    max_parallel_provisioning: int = 8
    # Fernet keys, the first one encrypting; empty: the embedded key file.
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    # Live databases per tenant unless the tenant has its own limit.
    tenant_quota: int = 10
    # Write requests per token and minute.
    rate_limit: int = 60
    # Whether a request may ask for a tenant role that is a superuser.
    allow_superuser: bool = False
    memory_limit: str = "1g"
    pids_limit: int = 512
    # Extra server options for every tenant container, e.g. ("-c", "shared_buffers=16MB").
    postgres_args: tuple[str, ...] = ()
    # Warm, running servers kept ready per version; empty: no pool.
    pool_sizes: Mapping[str, int] = field(default_factory=dict)

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

        def get(name: str) -> str | None:
            value = env.get(f"DBPROV_{name}")
            return value.strip() if value is not None and value.strip() != "" else None

        data_dir = Path(get("DATA_DIR") or platformdirs.user_data_dir("dbprov"))
        database_url = get("DATABASE_URL") or f"sqlite:///{data_dir / 'dbprov.sqlite3'}"
        images = _parse_images(get("IMAGES") or DEFAULT_IMAGES)
        default_version = get("DEFAULT_VERSION") or "17"
        if default_version not in images:
            raise SettingsError(
                "DBPROV_DEFAULT_VERSION",
                f"{default_version!r} is not among the versions of DBPROV_IMAGES "
                f"({', '.join(images)})",
            )
        instance = get("INSTANCE") or "default"
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", instance):
            raise SettingsError("DBPROV_INSTANCE", "letters, digits, '_', '.', '-', at most 63")
        return cls(
            database_url=database_url,
            data_dir=data_dir,
            port_range=_parse_port_range(get("PORT_RANGE") or "15432-16431"),
            bind_address=_parse_address("DBPROV_BIND_ADDRESS", get("BIND_ADDRESS") or "127.0.0.1"),
            public_host=get("PUBLIC_HOST") or "localhost",
            images=images,
            default_version=default_version,
            ready_timeout=_parse_seconds("DBPROV_READY_TIMEOUT", get("READY_TIMEOUT"), 60.0),
            request_timeout=_parse_seconds("DBPROV_REQUEST_TIMEOUT", get("REQUEST_TIMEOUT"), 90.0),
            reconcile_interval=_parse_seconds(
                "DBPROV_RECONCILE_INTERVAL", get("RECONCILE_INTERVAL"), 5.0
            ),
            instance=instance,
            probe_host=get("PROBE_HOST"),
            max_parallel_provisioning=_parse_count("DBPROV_MAX_PARALLEL", get("MAX_PARALLEL"), 8),
            secret_keys=_parse_keys(get("SECRET_KEY")),
            tenant_quota=_parse_count("DBPROV_TENANT_QUOTA", get("TENANT_QUOTA"), 10),
            rate_limit=_parse_count("DBPROV_RATE_LIMIT", get("RATE_LIMIT"), 60),
            allow_superuser=_parse_bool("DBPROV_ALLOW_SUPERUSER", get("ALLOW_SUPERUSER")),
            memory_limit=_parse_memory(get("MEMORY_LIMIT") or "1g"),
            pids_limit=_parse_count("DBPROV_PIDS_LIMIT", get("PIDS_LIMIT"), 512),
            pool_sizes=_parse_pool(get("POOL_SIZE"), images),
            postgres_args=_parse_postgres_args(get("POSTGRES_ARGS")),
        )

    def ensure_data_dir(self) -> None:
        """Create the data folder, private to its owner, when the defaults use it."""
        if self.database_url.startswith("sqlite:///"):
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


def _parse_port_range(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", value)
    if not match:
        raise SettingsError("DBPROV_PORT_RANGE", f"expected FIRST-LAST, got {value!r}")
    first, last = int(match[1]), int(match[2])
    if not (1 <= first <= last <= 65535):
        raise SettingsError(
            "DBPROV_PORT_RANGE", f"needs 1 <= FIRST <= LAST <= 65535, got {value!r}"
        )
    return first, last


def _parse_address(name: str, value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise SettingsError(name, f"{value!r} is not an IP address") from None
    return value


def _parse_images(value: str) -> dict[str, str]:
    images: dict[str, str] = {}
    for item in value.split(","):
        version, sep, image = (part.strip() for part in item.partition("="))
        if not sep or not re.fullmatch(r"\d+", version) or not image:
            raise SettingsError(
                "DBPROV_IMAGES", f"expected MAJOR=IMAGE[,MAJOR=IMAGE...], got {item.strip()!r}"
            )
        images[version] = image
    return images


def _parse_seconds(name: str, value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(name, f"expected a number of seconds, got {value!r}") from None
    if number <= 0:
        raise SettingsError(name, f"must be greater than zero, got {value!r}")
    return number


def _parse_count(name: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]+", value) or int(value) <= 0:
        raise SettingsError(name, f"expected a whole number greater than zero, got {value!r}")
    return int(value)


def _parse_bool(name: str, value: str | None) -> bool:
    if value is None:
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(name, f"expected true or false, got {value!r}")


def _parse_memory(value: str) -> str:
    if not re.fullmatch(r"[0-9]+[bkmg]?", value.lower()):
        raise SettingsError("DBPROV_MEMORY_LIMIT", f"expected a size such as 512m or 1g, got {value!r}")
    return value.lower()


def _parse_pool(value: str | None, images: dict[str, str]) -> dict[str, int]:
    """``N`` (every version) or ``MAJOR=N[,MAJOR=N...]``."""
    if value is None:
        return {}
    if re.fullmatch(r"[0-9]+", value):
        return {version: int(value) for version in images if int(value) > 0}
    sizes: dict[str, int] = {}
    for item in value.split(","):
        version, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not re.fullmatch(r"[0-9]+", size):
            raise SettingsError("DBPROV_POOL_SIZE", f"expected N or MAJOR=N[,...], got {item.strip()!r}")
        if version not in images:
            raise SettingsError("DBPROV_POOL_SIZE", f"version {version!r} is not in DBPROV_IMAGES")
        if int(size) > 0:
            sizes[version] = int(size)
    return sizes


def _parse_postgres_args(value: str | None) -> tuple[str, ...]:
    """``-c name=value`` options, as ``postgres`` takes them on its command line."""
    if value is None:
        return ()
    args = tuple(shlex.split(value))
    if len(args) % 2 or any(flag != "-c" for flag in args[::2]) or any(
        not re.fullmatch(r"[a-z_.]+=\S+", option) for option in args[1::2]
    ):
        raise SettingsError(
            "DBPROV_POSTGRES_ARGS", f"expected '-c name=value' options, got {value!r}"
        )
    return args


def _parse_keys(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    keys = tuple(key.strip() for key in value.split(",") if key.strip())
    for position, key in enumerate(keys, 1):
        if not is_valid_key(key):
            # Never echo the value: it is a secret.
            raise SettingsError(
                "DBPROV_SECRET_KEY",
                f"key {position} is not a Fernet key (32 url-safe base64-encoded bytes); "
                "make one with `dbprov keys generate`",
            )
    return keys

