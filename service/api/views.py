"""HTTP views: parse, call the domain layer, shape the answer. Nothing else."""

from __future__ import annotations

import re
from typing import Any

from flask import current_app, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from werkzeug.exceptions import UnsupportedMediaType

from ..errors import DbprovError, ProvisioningFailed
from ..models import Database, Status
from ..provisioning import connection_uri
from .problems import problem_response
from .schemas import (
    CredentialsSchema,
    DatabaseCreateSchema,
    DatabaseListQuerySchema,
    DatabasePageSchema,
    DatabaseSchema,
    DatabaseWithCredentialsSchema,
    HealthSchema,
)

databases = Blueprint("databases", __name__, description="PostgreSQL databases on demand")
health = Blueprint("health", __name__, description="Liveness and readiness of the service")

_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}}
_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "The database's URL"}}


def _services():
    return current_app.extensions["dbprov"]


def _present(record: Database, secret: bool = False) -> dict[str, Any]:
    host = _services().settings.public_host
    body: dict[str, Any] = {
        "id": record.id,
        "name": record.name,
        "status": record.status.value,
        "version": record.version,
        "image": record.image,
        "host": host,
        "port": record.host_port,
        "database": record.database_name,
        "username": record.username,
        "last_error": record.last_error,
        "phase_timings": record.phase_timings or {},
        "created_at": record.created_at,
        "ready_at": record.ready_at,
        "deleted_at": record.deleted_at,
    }
    if secret:
        body["password"] = record.password
        body["connection_uri"] = connection_uri(record, host) if record.host_port else None
    return body


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
    @databases.arguments(DatabaseListQuerySchema, location="query")
    @databases.response(200, DatabasePageSchema)
    def get(self, query):
        """List databases, newest first"""
        status = Status(query["status"]) if query.get("status") else None
        page = _services().databases.list(status, query["page"], query["page_size"])
        return {
            "items": [_present(record) for record in page.items],
            "page": page.page,
            "page_size": page.page_size,
            "total": page.total,
        }

    @databases.arguments(DatabaseCreateSchema, required=False)
    @databases.response(201, DatabaseWithCredentialsSchema, headers=_LOCATION)
    @databases.alt_response(
        202,
        schema=DatabaseWithCredentialsSchema,
        headers=_LOCATION,
        description="Accepted: still provisioning (asked with Prefer: respond-async, "
        "or the wait ran out). Poll the Location until status is ready or failed.",
        success=True,
    )
    @databases.alt_response(409, response="CONFLICT", description="The name is taken")
    @databases.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    @databases.alt_response(422, response="UNPROCESSABLE_ENTITY")
    @databases.alt_response(502, response="BAD_GATEWAY", description="The container never became ready")
    @databases.alt_response(
        503,
        response="SERVICE_UNAVAILABLE",
        description="No free host port, or the Docker engine or metadata store is unreachable",
    )
    def post(self, body):
        """Create a database and, unless asked not to, wait until it accepts connections"""
        services = _services()
        record = services.databases.create(body.get("name"), body.get("version"))
        asynchronous, wait = _preferences()
        headers = {"Location": url_for("databases.DatabaseItem", database_id=record.id)}
        if asynchronous:
            headers["Preference-Applied"] = "respond-async"
        else:
            timeout = services.settings.request_timeout
            record = services.databases.wait_until_settled(
                record.id, min(timeout, wait) if wait is not None else timeout
            )
        if record.status == Status.FAILED:
            raise ProvisioningFailed(
                f"database {record.id} did not become ready: {record.last_error}",
                database_id=record.id,
            )
        status = 201 if record.status == Status.READY else 202
        return _present(record, secret=True), status, headers


@databases.route("/databases/<string:database_id>")
class DatabaseItem(MethodView):
    @databases.response(200, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, database_id):
        """Show a database (without its password)"""
        return _present(_services().databases.get(database_id))

    @databases.response(202, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    def delete(self, database_id):
        """Delete a database: its container and volume are removed and its port freed"""
        return _present(_services().databases.delete(database_id))


@databases.route("/databases/<string:database_id>/credentials")
class DatabaseCredentials(MethodView):
    @databases.response(200, CredentialsSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, database_id):
        """Show a database's user, password and connection URI"""
        body = _present(_services().databases.get(database_id), secret=True)
        return {key: body[key] for key in CredentialsSchema().fields}


@health.route("/healthz")
class Liveness(MethodView):
    @health.response(200, HealthSchema)
    def get(self):
        """The process answers"""
        return {"status": "ok"}


@health.route("/readyz")
class Readiness(MethodView):
    @health.response(200, HealthSchema)
    @health.alt_response(503, response="SERVICE_UNAVAILABLE", description="Names what is unreachable")
    def get(self):
        """The metadata store and the Docker engine are both reachable"""
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
        return {"status": "ok", "checks": checks}
