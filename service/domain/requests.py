"""A create request checked against what this service offers.

The request itself is ``dbprov_client.CreateRequest``, one object from the
API's schema (and the web page's form) to the client. ``check`` turns it into
a ``NewDatabase``: what the record will hold, every field refused by name if
the service does not offer it, before anything is recorded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dbprov_client.create_request import DEFAULT, CreateRequest

from ..errors import Forbidden, ValidationError
from ..postgres.admin import TRUSTED_EXTENSIONS
from ..settings import Settings
from .models import Database, Snapshot, utcnow
from .parameters import check_values

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"

# Database-level settings a create may set (ALTER DATABASE ... SET): planner,
# memory, timeout and locale settings whose effect stays inside the database.
DATABASE_PARAMETERS = frozenset({
    "work_mem", "maintenance_work_mem", "temp_buffers", "statement_timeout", "lock_timeout",
    "idle_in_transaction_session_timeout", "idle_session_timeout", "search_path", "timezone",
    "datestyle", "intervalstyle", "default_transaction_isolation", "default_transaction_read_only",
    "random_page_cost", "seq_page_cost", "effective_cache_size", "effective_io_concurrency",
    "default_statistics_target", "jit", "synchronous_commit", "log_min_duration_statement",
})


@dataclass(frozen=True)
class NewDatabase:
    """What a new record holds: a create request checked, its sources found."""

    version: str
    name: str | None = None
    superuser: bool = False
    durable: bool = True
    expires_at: datetime | None = None
    protected: bool = False
    idle_stop: float | None = None
    plan: str = "default"
    parameters: Mapping[str, str] = field(default_factory=dict)
    extensions: tuple[str, ...] = ()
    # The snapshot its data is copied from, and the template it is a clone of.
    source: Snapshot | None = None
    template_id: str | None = None
    # Or a database of which a snapshot is taken along with the record.
    copy_of: Database | None = None

    @property
    def poolable(self) -> bool:
        """Whether a warm pool member is this, or can be made into it at its claim."""
        return self.plan == "default" and self.durable and self.copy_of is None and (
            self.source is None or self.template_id is not None
        )

    def columns(self) -> dict[str, Any]:
        """The record's columns this request decides."""
        return {
            "name": self.name, "superuser": self.superuser, "durable": self.durable,
            "expires_at": self.expires_at,
            "protected": self.protected, "idle_stop": self.idle_stop, "plan": self.plan,
            "parameters": dict(self.parameters), "extensions": list(self.extensions),
            "source_snapshot_id": self.source.id if self.source else None,
            "template_id": self.template_id,
        }


@dataclass(frozen=True)
class Idempotency:
    """A create's Idempotency-Key and the hash of its body."""

    key: str
    request_hash: str


def invalid(field_name: str, detail: str, message: str) -> ValidationError:
    return ValidationError(detail, errors={"json": {field_name: [message]}})


def _only(field_name: str, asked, allowed: frozenset[str] | set[str], why: str) -> None:
    """Refuse the first of ``asked`` that is not ``allowed``, naming it."""
    for name in asked:
        if name not in allowed:
            raise invalid(
                field_name, f"{field_name}: {name!r} is not allowed",
                f"{name}: {why}; allowed: {', '.join(sorted(allowed))}.",
            )


def check(settings: Settings, request: CreateRequest, version: str | None) -> NewDatabase:
    """Refuse what the service does not offer, naming the field; nothing is
    recorded. ``version``: the request's, or that of the data it copies."""
    version = version or settings.default_version
    if version not in settings.images:
        raise invalid("version", f"unsupported version {version!r}; supported: {', '.join(settings.images)}",
                      f"Must be one of: {', '.join(settings.images)}.")
    if request.name is not None and not re.fullmatch(NAME_PATTERN, request.name):
        raise invalid("name", "invalid name", f"Must match {NAME_PATTERN}.")
    if request.superuser and not settings.allow_superuser:
        raise Forbidden("this service does not hand out superuser roles (DBPROV_ALLOW_SUPERUSER)")
    plan = request.plan or "default"
    if plan not in settings.all_plans:
        raise invalid("plan", f"no plan {plan!r}; plans: {', '.join(settings.all_plans)}",
                      f"Must be one of: {', '.join(settings.all_plans)}.")
    parameters = dict(request.parameters or {})
    _only("parameters", parameters, DATABASE_PARAMETERS, "not a database-level setting this service allows")
    check_values(version, parameters)
    extensions = list(request.extensions or ())
    _only(
        "extensions", extensions, TRUSTED_EXTENSIONS | set(settings.allowed_extensions),
        "neither trusted nor allowed by DBPROV_ALLOWED_EXTENSIONS",
    )
    idle_stop = request.idle_stop
    if idle_stop is DEFAULT:
        idle_stop = settings.all_plans[plan].idle_stop or settings.idle_stop
    return NewDatabase(
        version=version, name=request.name, superuser=request.superuser, durable=request.durable,
        expires_at=expiry(settings, request.ttl, request.expires_at, default=True),
        protected=request.protected, idle_stop=idle_stop, plan=plan, parameters=parameters,
        extensions=tuple(dict.fromkeys(extensions)),
    )


def expiry(settings: Settings, ttl: float | None, expires_at: datetime | None, default: bool) -> datetime | None:
    """When a database asked to live ``ttl`` seconds, or until ``expires_at``, expires."""
    if ttl is not None and expires_at is not None:
        raise invalid("ttl", "give ttl or expires_at, not both", "Give ttl or expires_at, not both.")
    now = utcnow()
    if ttl is not None:
        expires = now + timedelta(seconds=ttl)
    elif expires_at is not None:
        if expires_at <= now:
            raise invalid("expires_at", "expires_at is in the past", "Must be in the future.")
        expires = expires_at
    elif default and (settings.default_ttl or settings.max_ttl):
        expires = now + timedelta(seconds=settings.default_ttl or settings.max_ttl)
    else:
        return None
    limit = settings.max_ttl
    if limit is not None and expires > now + timedelta(seconds=limit):
        raise invalid("ttl", f"the expiry is more than DBPROV_MAX_TTL ({limit:g} s) away",
                      f"At most {limit:g} seconds from now.")
    return expires
