"""What the API's views share: authentication and rate limiting, the caller, a database's body, waiting as asked.

Every view parses, calls the domain layer through ``current_services()`` and
shapes the answer with these; ``authenticate`` and ``require_json_body`` run
before each request of the blueprints that register them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flask import current_app, g, request
from flask_smorest import Blueprint
from werkzeug.exceptions import UnsupportedMediaType

from ..domain.databases import Credentials
from ..domain.models import COMING_UP, Database, Status
from ..domain.registry import LISTED
from ..domain.tenancy import LOCAL_ADMIN, Principal
from ..errors import DataLost, Forbidden, ProvisioningFailed
from .loopback import is_loopback_host


def guarded(blueprint: Blueprint, costly: bool = False):
    """Documents what authentication adds to an operation, and marks (and
    documents) one that costs the service work: only those count against the
    token's rate limit (``authenticate``)."""

    def decorate(view):
        view = blueprint.alt_response(
            401, response="UNAUTHORIZED", description="No token, or an unknown or revoked one"
        )(view)
        if costly:
            view = blueprint.alt_response(
                429, response="TOO_MANY_REQUESTS",
                description="Over the token's rate limit (DBPROV_RATE_BURST at once, then "
                "DBPROV_RATE_LIMIT a minute); see Retry-After",
            )(view)
            view.costly = True
        return view

    return decorate


def _costly() -> bool:
    """Whether the request's operation is marked costly by ``guarded``."""
    view_class = getattr(current_app.view_functions.get(request.endpoint), "view_class", None)
    return getattr(getattr(view_class, request.method.lower(), None), "costly", False)


def current_services():
    return current_app.extensions["dbprov"]


def current_principal() -> Principal:
    return g.principal


def present(record: Database, credentials: Credentials | None = None) -> dict[str, Any]:
    values = {column.key: getattr(record, column.key) for column in LISTED}
    return database_body(values, current_services().databases.host(record), credentials)


def database_body(values: Mapping[str, Any], host: str, credentials: Credentials | None = None) -> dict[str, Any]:
    """A database as the API shows it, from its LISTED columns (a mapping:
    a listed row's reads several times faster than its attributes)."""
    body: dict[str, Any] = {
        "id": values["id"],
        "tenant": values["tenant"],
        "name": values["name"],
        "status": values["status"].value,
        "version": values["version"],
        "image": values["image"],
        "host": host,
        "port": values["host_port"],
        "database": values["database_name"],
        "username": values["username"],
        "superuser": values["superuser"],
        "durable": values["durable"],
        "expires_at": values["expires_at"],
        "protected": values["protected"],
        "idle_stop": values["idle_stop"],
        "plan": values["plan"],
        "parameters": values["parameters"] or {},
        "extensions": values["extensions"] or [],
        "source_snapshot_id": values["source_snapshot_id"],
        "last_error": values["last_error"],
        "phase_timings": values["phase_timings"] or {},
        "created_at": values["created_at"],
        "ready_at": values["ready_at"],
        "deleted_at": values["deleted_at"],
    }
    if credentials is not None:
        body["password"] = credentials.password
        body["connection_uri"] = credentials.connection_uri
    return body


def preferences() -> tuple[bool, float | None]:
    """RFC 7240 ``Prefer``: respond-async, and wait=N (seconds) to cap the wait."""
    header = ",".join(request.headers.getlist("Prefer")).lower()
    tokens = [token.strip() for token in header.split(",") if token.strip()]
    asynchronous = "respond-async" in tokens
    wait = None
    for token in tokens:
        match = re.fullmatch(r"wait\s*=\s*(\d+)", token)
        if match:
            wait = float(match[1])
    return asynchronous, wait


def settled_answer(record: Database, success: int):
    """A waited-for database as an answer: 202 while it is still coming up,
    ``success`` once it is past that (ready, or since stopped or deleted, as a
    create retried with its Idempotency-Key may find it)."""
    if record.status == Status.FAILED:
        raise ProvisioningFailed(
            f"database {record.id} did not become ready: {record.last_error}",
            database_id=record.id,
        )
    if record.status == Status.LOST:
        raise DataLost(f"database {record.id} is lost: {record.last_error}", database_id=record.id)
    return 202 if record.status in COMING_UP else success


def wait_as_preferred(services, principal: Principal, record: Database, headers: dict[str, str]) -> Database:
    """Wait for readiness as the request's Prefer header asks (RFC 7240)."""
    asynchronous, wait = preferences()
    if asynchronous:
        headers["Preference-Applied"] = "respond-async"
        return record
    if record.status not in COMING_UP:
        return record  # settled already (a warm claim): nothing to read again
    timeout = services.settings.request_timeout
    return services.databases.wait_until_settled(
        principal, record.id, min(timeout, wait) if wait is not None else timeout
    )


def authenticate() -> None:
    services = current_services()
    if not services.auth_required:
        # Without tokens, any web page the local user opens could post a form
        # here; what a browser marks as coming from elsewhere is refused.
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and _from_another_site():
            raise Forbidden("with authentication off, only requests from this origin may change anything")
        g.principal = LOCAL_ADMIN
        return
    g.principal = services.tenants.authenticate(request.headers.get("Authorization"))
    # Deletes free what the rate limit protects, and renewals cost a row:
    # neither paces a test suite's teardown or a CI job's heartbeat.
    if _costly():
        services.tenants.check_rate(g.principal)


def _from_another_site() -> bool:
    if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    # Not the Host alone: a rebinding page names its own host in both.
    origin_host = urlsplit(origin).netloc.lower()
    return not (is_loopback_host(origin_host) and origin_host == request.host.lower())


def require_json_body() -> None:
    # webargs reads a body only when it is declared JSON, and would otherwise
    # treat it as empty: a form or text body must be refused, not ignored.
    if request.endpoint == "data.DatabaseRestore":
        return  # an archive, streamed to disk by its view, never read whole here
    if request.method in ("POST", "PUT", "PATCH") and request.get_data(cache=True):
        if not request.is_json:
            raise UnsupportedMediaType(
                f"the body must be application/json, not {request.mimetype or 'untyped'}"
            )
