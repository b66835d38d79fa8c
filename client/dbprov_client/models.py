"""What the API answers, as typed objects. Each keeps the whole answer in ``raw``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True)
class Database:
    """A database. ``password`` and ``connection_uri`` are set only where the
    API returns them: by a create (and ``Client.credentials`` for the others)."""

    id: str
    status: str
    tenant: str | None = None
    name: str | None = None
    version: str | None = None
    image: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    connection_uri: str | None = field(default=None, repr=False)
    superuser: bool = False
    durable: bool = True
    protected: bool = False
    idle_stop: float | None = None
    plan: str | None = None
    expires_at: datetime | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    extensions: list[str] = field(default_factory=list)
    last_error: str | None = None
    phase_timings: dict[str, float] = field(default_factory=dict)
    created_at: datetime | None = None
    ready_at: datetime | None = None
    deleted_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Database":
        return cls(
            id=body["id"],
            status=body["status"],
            tenant=body.get("tenant"),
            name=body.get("name"),
            version=body.get("version"),
            image=body.get("image"),
            host=body.get("host"),
            port=body.get("port"),
            database=body.get("database"),
            username=body.get("username"),
            password=body.get("password"),
            connection_uri=body.get("connection_uri"),
            superuser=bool(body.get("superuser", False)),
            durable=bool(body.get("durable", True)),
            protected=bool(body.get("protected", False)),
            idle_stop=body.get("idle_stop"),
            plan=body.get("plan"),
            expires_at=_time(body.get("expires_at")),
            parameters=dict(body.get("parameters") or {}),
            extensions=list(body.get("extensions") or []),
            last_error=body.get("last_error"),
            phase_timings=dict(body.get("phase_timings") or {}),
            created_at=_time(body.get("created_at")),
            ready_at=_time(body.get("ready_at")),
            deleted_at=_time(body.get("deleted_at")),
            raw=body,
        )


@dataclass(frozen=True)
class DatabasePage:
    items: list[Database]
    page: int
    page_size: int
    total: int

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "DatabasePage":
        return cls([Database.from_dict(i) for i in body["items"]], body["page"],
                   body["page_size"], body["total"])


@dataclass(frozen=True)
class Credentials:
    username: str
    database: str
    host: str
    port: int | None
    password: str = field(repr=False)
    connection_uri: str | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Credentials":
        return cls(body["username"], body["database"], body["host"], body.get("port"),
                   body["password"], body.get("connection_uri"))


@dataclass(frozen=True)
class Event:
    id: int
    database_id: str
    tenant: str
    at: datetime
    kind: str
    actor: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Event":
        return cls(body["id"], body["database_id"], body["tenant"], datetime.fromisoformat(body["at"]),
                   body["kind"], body["actor"], dict(body.get("details") or {}))


@dataclass(frozen=True)
class Plan:
    name: str
    memory: str
    cpus: float | None = None
    settings: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Plan":
        return cls(body["name"], body["memory"], body.get("cpus"), dict(body.get("settings") or {}))


@dataclass(frozen=True)
class Quota:
    tenant: str
    used: int
    limit: int

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Quota":
        return cls(body["tenant"], body["used"], body["limit"])


@dataclass(frozen=True)
class Health:
    status: str
    checks: dict[str, str] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    # The storage backend ("btrfs" or "copy"); for an admin, why, and the pool's room.
    storage: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Health":
        return cls(
            body["status"], dict(body.get("checks") or {}), dict(body.get("images") or {}),
            dict(body.get("storage") or {}),
        )


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of a database's data: ``pending``, ``ready``, ``failed``,
    ``deleting`` or ``deleted``. It outlives its database."""

    id: str
    status: str
    database_id: str
    tenant: str | None = None
    version: str | None = None
    size_bytes: int | None = None
    last_error: str | None = None
    created_at: datetime | None = None
    ready_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Snapshot":
        return cls(
            id=body["id"], status=body["status"], database_id=body["database_id"],
            tenant=body.get("tenant"), version=body.get("version"), size_bytes=body.get("size_bytes"),
            last_error=body.get("last_error"), created_at=_time(body.get("created_at")),
            ready_at=_time(body.get("ready_at")), raw=body,
        )


@dataclass(frozen=True)
class Template:
    """A template keyed by a hash of migrations: ``building``, ``finalizing``,
    ``ready`` or ``failed``. ``database`` (with its credentials) is set only in
    the answer to the client that is to fill it."""

    id: str
    key: str
    status: str
    version: str | None = None
    pool_size: int = 0
    snapshot_id: str | None = None
    created_at: datetime | None = None
    ready_at: datetime | None = None
    database: Database | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Template":
        database = body.get("database")
        return cls(
            id=body["id"], key=body["key"], status=body["status"], version=body.get("version"),
            pool_size=int(body.get("pool_size") or 0), snapshot_id=body.get("snapshot_id"),
            created_at=_time(body.get("created_at")), ready_at=_time(body.get("ready_at")),
            database=Database.from_dict(database) if database else None, raw=body,
        )
