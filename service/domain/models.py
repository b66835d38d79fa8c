"""The metadata store's tables."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy import false as sa_false
from sqlalchemy import true as sa_true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class Status(str, enum.Enum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    RESETTING = "resetting"
    DELETING = "deleting"
    DELETED = "deleted"
    # Was ready, but the machine holding its server and data cannot be reached
    # (a Swarm node down or removed): it comes back by itself with that machine.
    UNAVAILABLE = "unavailable"
    # Its data is gone, removed behind the service's back (a `docker system
    # prune --volumes`): never passed off as an empty ready database. A reset
    # to a snapshot brings it back; DELETE lets it go.
    LOST = "lost"
    # Stopped for want of clients (its idle_stop): the service holds its port
    # and starts it again on the first connection. WAKING is that start.
    SLEEPING = "sleeping"
    WAKING = "waking"


# Named sets of statuses, so that a decision reads as what it means.
# Being brought up: the reconciler provisions these.
SETTLING = frozenset({Status.PENDING, Status.PROVISIONING})
# Stopped on purpose, or on the way there or back, or being put back to a
# snapshot: the port is kept, and drift repair leaves the server alone.
RESTING = frozenset({Status.STOPPING, Status.STOPPED, Status.STARTING, Status.RESETTING, Status.SLEEPING})
# Still holding (or possibly holding) a server, its data, a port or a name.
# An unavailable one holds all of them, on a machine that is away.
NOT_DELETED = frozenset({
    *SETTLING, Status.READY, Status.UNAVAILABLE, *RESTING, Status.WAKING, Status.FAILED, Status.LOST,
    Status.DELETING,
})
# Whose server may exist and is wanted; a failed one had its server removed.
# An unavailable one's server and data exist where they were: the orphan
# sweep must leave them alone.
OWNS_SERVER = frozenset({
    *SETTLING, Status.READY, Status.UNAVAILABLE, *RESTING, Status.WAKING, Status.DELETING,
})
# Being brought up until SELECT 1 works: a create, a start or a reset; waiters wait for these.
COMING_UP = frozenset({*SETTLING, Status.STARTING, Status.RESETTING, Status.WAKING})
# Whose server is meant to run, which drift checks each pass: a ready one's is
# started again if it stopped, an unavailable one's brought back once its
# machine is.
MEANT_TO_RUN = frozenset({Status.READY, Status.UNAVAILABLE})
# Whose data a snapshot may copy (and a reset replace): a sleeping one's
# is copied as it lies, without waking it.
SNAPSHOT_SOURCES = frozenset({Status.READY, Status.STOPPED, Status.SLEEPING})
# Past which a DELETE has nothing more to do.
DELETING_OR_DELETED = frozenset({Status.DELETING, Status.DELETED})

# The moves a database's status may make, and nothing else: ``Records`` refuses
# any other. ``None`` is where a new record starts. Every live status may be
# deleted; a write that keeps the status is no move.
DATABASE_MOVES: dict[Status | None, frozenset[Status]] = {
    None: frozenset({Status.PENDING}),
    Status.PENDING: frozenset({Status.PROVISIONING, Status.FAILED, Status.LOST, Status.DELETING}),
    Status.PROVISIONING: frozenset({Status.READY, Status.FAILED, Status.LOST, Status.DELETING}),
    # Provisioning again: a warm member claimed by a create that needs a set-up
    # of its own, or a server that stopped behind the service's back.
    Status.READY: frozenset({Status.PROVISIONING, Status.UNAVAILABLE, Status.STOPPING, Status.RESETTING,
                             Status.SLEEPING, Status.LOST, Status.DELETING}),
    Status.UNAVAILABLE: frozenset({Status.READY, Status.PROVISIONING, Status.LOST, Status.DELETING}),
    Status.STOPPING: frozenset({Status.STOPPED, Status.DELETING}),
    Status.STOPPED: frozenset({Status.STARTING, Status.RESETTING, Status.DELETING}),
    Status.STARTING: frozenset({Status.READY, Status.FAILED, Status.LOST, Status.DELETING}),
    # Woken by a connection or a start; stopped or reset as a stopped one is.
    Status.SLEEPING: frozenset({Status.WAKING, Status.STOPPING, Status.RESETTING, Status.DELETING}),
    # Asleep again after a wake that failed for a passing reason: the next connection tries again.
    Status.WAKING: frozenset({Status.READY, Status.SLEEPING, Status.FAILED, Status.LOST, Status.DELETING}),
    Status.RESETTING: frozenset({Status.READY, Status.FAILED, Status.LOST, Status.DELETING}),
    # Started again on a new port, if it held data once.
    Status.FAILED: frozenset({Status.STARTING, Status.DELETING}),
    # Put back to a snapshot of it.
    Status.LOST: frozenset({Status.RESETTING, Status.DELETING}),
    Status.DELETING: frozenset({Status.DELETED}),
    Status.DELETED: frozenset(),
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware datetimes on every backend (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    # Stable constraint names, so migrations can refer to them on every backend.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Tenant(Base):
    """A team whose databases are kept apart from everyone else's."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    # Live databases allowed; NULL: DBPROV_TENANT_QUOTA.
    database_limit: Mapped[int | None] = mapped_column(Integer)
    # Plans its databases may use; NULL: every plan.
    plans: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Token(Base):
    """An API token; only a hash of its secret is kept."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RateBucket(Base):
    """One token's rate limit (GCRA): when its bucket is next full again."""

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Seconds since the epoch.
    due: Mapped[float] = mapped_column(Float)


class Database(Base):
    """One requested PostgreSQL server and everything the service knows of it."""

    __tablename__ = "databases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(63))
    status: Mapped[Status] = mapped_column(
        Enum(Status, name="database_status", native_enum=False, length=16,
             values_callable=lambda e: [m.value for m in e]),
        index=True,
    )
    version: Mapped[str] = mapped_column(String(8))
    image: Mapped[str] = mapped_column(String(255))
    # Held only while a container may be published on it; released (NULL) once
    # the database is failed or deleted. Unique, so two records can never
    # hold the same port, whatever the application does (NULLs never collide).
    host_port: Mapped[int | None] = mapped_column(Integer, unique=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    database_name: Mapped[str] = mapped_column(String(63))
    username: Mapped[str] = mapped_column(String(63))
    # Encrypted (crypto.Vault), as is admin_password.
    password: Mapped[str] = mapped_column(String(255))
    # A rotation's new password, from before it is set on the server until
    # it is the password: one whose process ended in between is finished by
    # the reconciler once it is older than any rotation takes.
    pending_password: Mapped[str | None] = mapped_column(String(255))
    pending_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Whether the tenant's role is a superuser (asked for, and allowed by settings).
    superuser: Mapped[bool] = mapped_column(Boolean, default=False)
    # The container's own superuser, kept by the service for its maintenance.
    admin_username: Mapped[str] = mapped_column(String(63))
    admin_password: Mapped[str] = mapped_column(String(255))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Transient failures in a row, when the next try is due, and since when
    # (for the retry budget); reset once a step succeeds.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retrying_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Where the service reaches the server (the runtime's endpoint host).
    server_host: Mapped[str | None] = mapped_column(String(255))
    # Whether its server was made with a certificate from the service's CA;
    # one made before the service had a CA is not, until it is made anew.
    tls: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # When the reconciler deletes it by itself; NULL: never.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    # Refuses DELETE and expiry while set.
    protected: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # False: its server runs with fsync off, for data that may be lost if the
    # machine (not the server, the service or the engine) goes down.
    durable: Mapped[bool] = mapped_column(Boolean, default=True, server_default=sa_true())
    # The operator's named size (DBPROV_PLANS).
    plan: Mapped[str] = mapped_column(String(63), default="default", server_default="default")
    # Database-level settings (ALTER DATABASE ... SET) and extensions asked for at create.
    # NULL for records older than these columns: none asked for.
    parameters: Mapped[dict[str, str] | None] = mapped_column(JSON, default=dict)
    extensions: Mapped[list[str] | None] = mapped_column(JSON, default=list)
    # Seconds without clients after which it sleeps; NULL: never. Set at
    # create from the request, the plan or DBPROV_IDLE_STOP.
    idle_stop: Mapped[float | None] = mapped_column(Float)
    # The last time the service saw a client connected, for the idle stop.
    active_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The snapshot its data comes from (a clone, a template's database, a
    # reset), and when that copy was made: until then the server must not start.
    source_snapshot_id: Mapped[str | None] = mapped_column(String(32))
    seeded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The template whose warm pool holds it, or whose database it is.
    template_id: Mapped[str | None] = mapped_column(String(32), index=True)
    # Seconds each provisioning phase took, e.g. {"server": 0.6, "ready": 1.3, "setup": 0.05}.
    phase_timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        # The list, newest first, of one tenant or of all: read in index order, no sort.
        Index("ix_databases_tenant_created_at", "tenant", "created_at", "id"),
        Index("ix_databases_created_at", "created_at", "id"),
        # The same filtered by status (?status=ready), of one tenant or of all.
        Index("ix_databases_tenant_status_created_at", "tenant", "status", "created_at", "id"),
        Index("ix_databases_status_created_at", "status", "created_at", "id"),
        # A name is unique within a tenant among databases that are not deleted.
        Index(
            "uq_databases_tenant_live_name",
            "tenant",
            "name",
            unique=True,
            sqlite_where=text("status != 'deleted'"),
            postgresql_where=text("status != 'deleted'"),
        ),
    )


class Event(Base):
    """Something that happened to a database, for people to read."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    database_id: Mapped[str] = mapped_column(String(32), index=True)
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # requested, provisioning, ready, failed, retrying, stopped, started, expired, ...
    kind: Mapped[str] = mapped_column(String(32))
    # "token:<id>" for a request, "service" for the service's own doing.
    actor: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class IdempotencyKey(Base):
    """A create's Idempotency-Key, kept for the retention window."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(63), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # SHA-256 of the request body: the same key with another body is refused.
    request_hash: Mapped[str] = mapped_column(String(64))
    database_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class SnapshotStatus(str, enum.Enum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


# Snapshots whose data exists or is being made.
SNAPSHOT_LIVE = frozenset({SnapshotStatus.PENDING, SnapshotStatus.READY, SnapshotStatus.DELETING})
SNAPSHOT_MOVES: dict[SnapshotStatus | None, frozenset[SnapshotStatus]] = {
    None: frozenset({SnapshotStatus.PENDING}),
    SnapshotStatus.PENDING: frozenset({SnapshotStatus.READY, SnapshotStatus.FAILED, SnapshotStatus.DELETING}),
    SnapshotStatus.READY: frozenset({SnapshotStatus.DELETING}),
    SnapshotStatus.FAILED: frozenset({SnapshotStatus.DELETING}),
    SnapshotStatus.DELETING: frozenset({SnapshotStatus.DELETED}),
    SnapshotStatus.DELETED: frozenset(),
}


class Snapshot(Base):
    """A consistent copy of a database's data, outliving the database."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    database_id: Mapped[str] = mapped_column(String(32), index=True)
    # Set for a template's snapshot, which the template owns.
    template_id: Mapped[str | None] = mapped_column(String(32))
    # Set for the snapshot a clone from_database was made from, which the
    # clone owns: not counted against the snapshot quota, and removed with it.
    owner_id: Mapped[str | None] = mapped_column(String(32), index=True)
    status: Mapped[SnapshotStatus] = mapped_column(
        Enum(SnapshotStatus, name="snapshot_status", native_enum=False, length=16,
             values_callable=lambda e: [m.value for m in e]),
        index=True,
    )
    version: Mapped[str] = mapped_column(String(8))
    image: Mapped[str] = mapped_column(String(255))
    # The server superuser inside the copied data, so that a server made from
    # it can be logged into; encrypted like every password.
    admin_username: Mapped[str] = mapped_column(String(63))
    admin_password: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TemplateStatus(str, enum.Enum):
    BUILDING = "building"
    FINALIZING = "finalizing"
    READY = "ready"
    FAILED = "failed"
    DELETED = "deleted"


# A template is deleted at once: its database and snapshot go their own ways.
TEMPLATE_MOVES: dict[TemplateStatus | None, frozenset[TemplateStatus]] = {
    None: frozenset({TemplateStatus.BUILDING}),
    TemplateStatus.BUILDING: frozenset({TemplateStatus.FINALIZING, TemplateStatus.DELETED}),
    TemplateStatus.FINALIZING: frozenset({TemplateStatus.READY, TemplateStatus.FAILED, TemplateStatus.DELETED}),
    TemplateStatus.READY: frozenset({TemplateStatus.DELETED}),
    TemplateStatus.FAILED: frozenset({TemplateStatus.DELETED}),
    TemplateStatus.DELETED: frozenset(),
}


class Template(Base):
    """A migrated database kept as a snapshot under a client's key (a hash of
    its migrations), from which clones are made."""

    __tablename__ = "templates"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"))
    key: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(8))
    status: Mapped[TemplateStatus] = mapped_column(
        Enum(TemplateStatus, name="template_status", native_enum=False, length=16,
             values_callable=lambda e: [m.value for m in e]),
    )
    # The database its builder fills, then the snapshot taken of it.
    database_id: Mapped[str | None] = mapped_column(String(32))
    snapshot_id: Mapped[str | None] = mapped_column(String(32))
    # Warm clones kept ready.
    pool_size: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        # One live template per key and tenant; a deleted one frees the key.
        Index(
            "uq_templates_tenant_live_key", "tenant", "key", unique=True,
            sqlite_where=text("status != 'deleted'"), postgresql_where=text("status != 'deleted'"),
        ),
    )


class CertificateAuthority(Base):
    """The CA that signs every database server's certificate. One per
    installation, here so that every API and worker process finds the same:
    the first process to need it makes it (see ``tls.Authority``)."""

    __tablename__ = "certificate_authorities"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    # PEM; public (GET /ca.pem).
    certificate: Mapped[str] = mapped_column(Text)
    # PEM, encrypted (crypto.Vault) like every stored secret.
    private_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# Upper bounds (seconds) of the provisioning phase histogram's buckets, and
# the phases it counts. A change to either needs a migration of the rows.
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
PHASES = ("copy", "server", "ready", "setup", "claim", "total", "wake")


class PhaseHistogram(Base):
    """How long each provisioning phase took, as a cumulative histogram: a row
    per phase and bucket (``bucket`` indexes PHASE_BUCKETS; the last, +Inf,
    holds every observation), counted up in the transaction that records a
    database's phases. A scrape of /metrics reads these few rows, however
    many databases there are, and the counts survive their records."""

    __tablename__ = "phase_histogram"

    phase: Mapped[str] = mapped_column(String(16), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    # The observations' sum, over the same ones as ``count``.
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
