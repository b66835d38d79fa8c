"""HTTP views: parse, call the domain layer, shape the answer. Nothing else."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flask import Response, current_app, g, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import RAISE
from werkzeug.exceptions import UnsupportedMediaType

from ..errors import DbprovError, ProvisioningFailed
from ..models import SETTLING, Database, Status
from ..databases import Credentials, Idempotency
from ..tenancy import LOCAL_ADMIN, Principal
from .problems import problem_response
from ..errors import ValidationError
from .schemas import (
    CredentialsSchema,
    DatabaseCreateSchema,
    DatabaseListQuerySchema,
    DatabasePageSchema,
    DatabaseSchema,
    DatabaseUpdateSchema,
    DatabaseWithCredentialsSchema,
    EventListSchema,
    EventQuerySchema,
    HealthSchema,
    LogQuerySchema,
    PlanListSchema,
    QuotaSchema,
)

databases = Blueprint("databases", __name__, description="PostgreSQL databases on demand")
quota = Blueprint("quota", __name__, description="The tenant's share of the service: quota and plans")
health = Blueprint("health", __name__, description="Liveness and readiness of the service")

_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "The database's URL"}}


def _guarded(blueprint: Blueprint, write: bool = False):
    """Documents what authentication, and for writes rate limiting, adds to an operation."""

    def decorate(view):
        view = blueprint.alt_response(
            401, response="UNAUTHORIZED", description="No token, or an unknown or revoked one"
        )(view)
        if write:
            view = blueprint.alt_response(
                429, response="TOO_MANY_REQUESTS",
                description="Over the token's write requests per minute; see Retry-After",
            )(view)
        return view

    return decorate


def _services():
    return current_app.extensions["dbprov"]


def _principal() -> Principal:
    return g.principal


def _present(record: Database, credentials: Credentials | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": record.id,
        "tenant": record.tenant,
        "name": record.name,
        "status": record.status.value,
        "version": record.version,
        "image": record.image,
        "host": _services().settings.public_host,
        "port": record.host_port,
        "database": record.database_name,
        "username": record.username,
        "superuser": record.superuser,
        "expires_at": record.expires_at,
        "protected": record.protected,
        "plan": record.plan,
        "parameters": record.parameters or {},
        "extensions": record.extensions or [],
        "last_error": record.last_error,
        "phase_timings": record.phase_timings or {},
        "created_at": record.created_at,
        "ready_at": record.ready_at,
        "deleted_at": record.deleted_at,
    }
    if credentials is not None:
        body["password"] = credentials.password
        body["connection_uri"] = credentials.connection_uri
    return body


def _credentials_body(credentials: Credentials) -> dict[str, Any]:
    return {
        "username": credentials.username,
        "password": credentials.password,
        "database": credentials.database,
        "host": credentials.host,
        "port": credentials.port,
        "connection_uri": credentials.connection_uri,
    }


def _preferences() -> tuple[bool, float | None]:
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


def _idempotency(body: dict) -> Idempotency | None:
    """The Idempotency-Key header (IETF httpapi draft) with a hash of the request it came with."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    # The draft's key is a string; quoted as a structured field, or bare.
    key = key.strip().removeprefix('"').removesuffix('"')
    if not re.fullmatch(r"[\x21-\x7e]{1,255}", key):
        raise ValidationError(
            "the Idempotency-Key must be 1 to 255 visible ASCII characters",
            errors={"headers": {"Idempotency-Key": ["Must be 1 to 255 visible ASCII characters."]}},
        )
    # The parsed body, so that spacing and key order do not make a different request.
    canonical = json.dumps(body, sort_keys=True, default=str)
    return Idempotency(key, hashlib.sha256(canonical.encode()).hexdigest())


def _settled_answer(record: Database, success: int):
    """A waited-for database as an answer: 202 while it is still coming up,
    ``success`` once it is past that (ready, or since stopped or deleted, as a
    create retried with its Idempotency-Key may find it)."""
    if record.status == Status.FAILED:
        raise ProvisioningFailed(
            f"database {record.id} did not become ready: {record.last_error}",
            database_id=record.id,
        )
    return 202 if record.status in SETTLING | {Status.STARTING} else success


def _wait(services, principal: Principal, record: Database, headers: dict[str, str]) -> Database:
    """Wait for readiness as the request's Prefer header asks (RFC 7240)."""
    asynchronous, wait = _preferences()
    if asynchronous:
        headers["Preference-Applied"] = "respond-async"
        return record
    timeout = services.settings.request_timeout
    return services.databases.wait_until_settled(
        principal, record.id, min(timeout, wait) if wait is not None else timeout
    )


@databases.before_request
@quota.before_request
def _authenticate() -> None:
    services = _services()
    if not services.auth_required:
        g.principal = LOCAL_ADMIN
        return
    g.principal = services.tenants.authenticate(request.headers.get("Authorization"))
    if request.method in ("POST", "PUT", "PATCH", "DELETE"):
        services.tenants.check_rate(g.principal)


@databases.before_request
def _require_json_body() -> None:
    # webargs reads a body only when it is declared JSON, and would otherwise
    # treat it as empty: a form or text body must be refused, not ignored.
    if request.method in ("POST", "PUT", "PATCH") and request.get_data(cache=True):
        if not request.is_json:
            raise UnsupportedMediaType(
                f"the body must be application/json, not {request.mimetype or 'untyped'}"
            )


@databases.route("/databases")
class DatabaseCollection(MethodView):
    # unknown=RAISE: a misspelt filter is an error, not silently "everything".
    @databases.arguments(DatabaseListQuerySchema, location="query", unknown=RAISE)
    @_guarded(databases)
    @databases.response(200, DatabasePageSchema)
    def get(self, query):
        """List databases, newest first"""
        status = Status(query["status"]) if query.get("status") else None
        page = _services().databases.list(_principal(), status, query["page"], query["page_size"])
        return {
            "items": [_present(record) for record in page.items],
            "page": page.page,
            "page_size": page.page_size,
            "total": page.total,
        }

    @databases.arguments(DatabaseCreateSchema, required=False)
    @_guarded(databases, write=True)
    @databases.response(201, DatabaseWithCredentialsSchema, headers=_LOCATION)
    @databases.alt_response(
        202,
        schema=DatabaseWithCredentialsSchema,
        headers=_LOCATION,
        description="Accepted: still provisioning (asked with Prefer: respond-async, "
        "or the wait ran out). Poll the Location until status is ready or failed.",
        success=True,
    )
    @databases.alt_response(
        403, response="FORBIDDEN",
        description="Over the tenant's quota (type ...:quota-exceeded), or a superuser role "
        "that the service does not allow",
    )
    @databases.alt_response(
        409, response="CONFLICT",
        description="The name is taken",
    )
    @databases.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    @databases.alt_response(
        422, response="UNPROCESSABLE_ENTITY",
        description="Invalid body, or the version's image is missing and cannot be pulled "
        "(type ...:image-missing, naming the image)",
    )
    @databases.alt_response(502, response="BAD_GATEWAY", description="The server never became ready")
    @databases.alt_response(
        503,
        response="SERVICE_UNAVAILABLE",
        description="No free host port, the version's image is being pulled, or the Docker "
        "engine or metadata store is unreachable; see Retry-After",
    )
    def post(self, body):
        """Create a database and, unless asked not to, wait until it accepts connections"""
        services = _services()
        principal = _principal()
        record = services.databases.create(
            principal,
            body.get("name"),
            body.get("version"),
            body.get("superuser", False),
            ttl=body.get("ttl"),
            expires_at=body.get("expires_at"),
            protected=body.get("protected", False),
            plan=body.get("plan"),
            parameters=body.get("parameters"),
            extensions=body.get("extensions"),
            idempotency=_idempotency(body),
        )
        headers = {"Location": url_for("databases.DatabaseItem", database_id=record.id)}
        record = _wait(services, principal, record, headers)
        status = _settled_answer(record, 201)
        return _present(record, services.databases.credentials(record)), status, headers


@databases.route("/databases/<string:database_id>")
class DatabaseItem(MethodView):
    @_guarded(databases)
    @databases.response(200, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, database_id):
        """Show a database (without its password)"""
        return _present(_services().databases.get(_principal(), database_id))

    @databases.arguments(DatabaseUpdateSchema)
    @_guarded(databases, write=True)
    @databases.response(200, DatabaseSchema)
    @databases.alt_response(403, response="FORBIDDEN", description="Removing the expiry, where DBPROV_MAX_TTL forbids it")
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is being deleted")
    @databases.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    @databases.alt_response(422, response="UNPROCESSABLE_ENTITY")
    def patch(self, body, database_id):
        """Renew or remove a database's expiry, or set its protection"""
        return _present(_services().databases.update(_principal(), database_id, body))

    @_guarded(databases, write=True)
    @databases.response(202, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is protected")
    def delete(self, database_id):
        """Delete a database: its container and volume are removed and its port freed"""
        return _present(_services().databases.delete(_principal(), database_id))


@databases.route("/databases/<string:database_id>/stop")
class DatabaseStop(MethodView):
    @_guarded(databases, write=True)
    @databases.response(202, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is not ready")
    def post(self, database_id):
        """Stop a database's server: its data, port and password are kept, its memory freed"""
        return _present(_services().databases.stop(_principal(), database_id))


@databases.route("/databases/<string:database_id>/start")
class DatabaseStart(MethodView):
    @_guarded(databases, write=True)
    @databases.response(200, DatabaseSchema)
    @databases.alt_response(
        202, schema=DatabaseSchema, success=True,
        description="Accepted: still starting (asked with Prefer: respond-async, or the wait ran out)",
    )
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is not stopped")
    @databases.alt_response(502, response="BAD_GATEWAY", description="The server did not come back")
    def post(self, database_id):
        """Start a stopped database and, unless asked not to, wait until it accepts connections"""
        services = _services()
        principal = _principal()
        record = services.databases.start(principal, database_id)
        headers: dict[str, str] = {}
        record = _wait(services, principal, record, headers)
        return _present(record), _settled_answer(record, 200), headers


@databases.route("/databases/<string:database_id>/events")
class DatabaseEvents(MethodView):
    @databases.arguments(EventQuerySchema, location="query", unknown=RAISE)
    @_guarded(databases)
    @databases.response(200, EventListSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, query, database_id):
        """A database's events, oldest first: what happened, when, and who did it"""
        return {"items": _services().databases.events(_principal(), database_id, **query)}


@databases.route("/events")
class Events(MethodView):
    @databases.arguments(EventQuerySchema, location="query", unknown=RAISE)
    @_guarded(databases)
    @databases.response(200, EventListSchema)
    @databases.alt_response(403, response="FORBIDDEN", description="Not an admin token")
    def get(self, query):
        """Events of every database, oldest first (admin tokens only)"""
        return {"items": _services().databases.events(_principal(), None, **query)}


@databases.route("/databases/<string:database_id>/logs")
class DatabaseLogs(MethodView):
    @databases.arguments(LogQuerySchema, location="query", unknown=RAISE)
    @_guarded(databases)
    @databases.response(
        200, {"type": "string"}, content_type="text/plain",
        description="The last lines of the server's log",
    )
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, query, database_id):
        """The last lines of a database's server log, as text"""
        text = _services().databases.logs(_principal(), database_id, query["tail"])
        return Response(text, mimetype="text/plain")


@databases.route("/databases/<string:database_id>/credentials")
class DatabaseCredentials(MethodView):
    @_guarded(databases)
    @databases.response(200, CredentialsSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, database_id):
        """Show a database's user, password and connection URI"""
        domain = _services().databases
        return _credentials_body(domain.credentials(domain.get(_principal(), database_id)))


@databases.route("/databases/<string:database_id>/credentials/rotate")
class CredentialsRotation(MethodView):
    @_guarded(databases, write=True)
    @databases.response(200, CredentialsSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is not ready")
    @databases.alt_response(502, response="BAD_GATEWAY", description="The server refused; the old password still works")
    def post(self, database_id):
        """Give the database's user a new password; the old one stops working at once"""
        _record, credentials = _services().databases.rotate_password(_principal(), database_id)
        return _credentials_body(credentials)


@quota.route("/quota")
class Quota(MethodView):
    @_guarded(quota)
    @quota.response(200, QuotaSchema)
    def get(self):
        """The tenant's live databases and its limit"""
        principal = _principal()
        used, limit = _services().tenants.quota(principal.tenant)
        return {"tenant": principal.tenant, "used": used, "limit": limit}


@quota.route("/plans")
class Plans(MethodView):
    @_guarded(quota)
    @quota.response(200, PlanListSchema)
    def get(self):
        """The plans a create may name: memory, CPUs and server settings"""
        return {
            "items": [
                {"name": p.name, "memory": p.memory, "cpus": p.cpus, "settings": dict(p.settings)}
                for p in _services().settings.all_plans.values()
            ]
        }


@health.route("/healthz")
class Liveness(MethodView):
    @health.doc(security=[])
    @health.response(200, HealthSchema)
    def get(self):
        """The process answers"""
        return {"status": "ok"}


@health.route("/readyz")
class Readiness(MethodView):
    @health.doc(security=[])
    @health.response(200, HealthSchema)
    @health.alt_response(503, response="SERVICE_UNAVAILABLE", description="Names what is unreachable")
    def get(self):
        """The metadata store and the Docker engine are both reachable; each version's image"""
        services = _services()
        checks = {}
        for name, ping in (("metadata", services.store.ping), ("docker", services.runtime.ping)):
            try:
                ping()
                checks[name] = "ok"
            except DbprovError as exc:
                checks[name] = exc.detail
        failing = [name for name, result in checks.items() if result != "ok"]
        if failing:
            return problem_response(
                503,
                "Not ready",
                f"unreachable: {', '.join(failing)}",
                slug="not-ready",
                headers={"Retry-After": "5"},
                checks=checks,
            )
        images = services.images.check()
        # A missing image takes only its version out of service, not the API:
        # "degraded" says so without failing a load balancer's check.
        status = "ok" if all(state == "available" for state in images.values()) else "degraded"
        return {"status": status, "checks": checks, "images": images}
