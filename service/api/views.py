"""HTTP views: parse, call the domain layer, shape the answer. Nothing else."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
from flask import Response, current_app, g, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import RAISE
from werkzeug.exceptions import UnsupportedMediaType

from ..domain.databases import Credentials
from ..domain.models import COMING_UP, Database, Status
from ..domain.registry import LISTED
from ..domain.requests import CreateRequest, Idempotency
from ..domain.tenancy import LOCAL_ADMIN, Principal
from ..errors import DataLost, DbprovError, Forbidden, ProvisioningFailed, ValidationError
from .loopback import is_loopback_host
from .problems import problem_response
from .schemas import (
    CredentialsSchema,
    DatabaseCreateSchema,
    DatabaseListQuerySchema,
    DatabasePageSchema,
    DatabaseSchema,
    DatabaseUpdateSchema,
    DatabaseWithCredentialsSchema,
    DumpQuerySchema,
    EventListSchema,
    EventQuerySchema,
    HealthSchema,
    LogQuerySchema,
    PlanListSchema,
    QuotaSchema,
    ResetSchema,
    RestoreQuerySchema,
    ServerDatabaseListSchema,
    SnapshotListSchema,
    SnapshotSchema,
    TemplateCreateSchema,
    TemplateFinalizeSchema,
    TemplateListSchema,
    TemplateSchema,
)

databases = Blueprint("databases", __name__, description="PostgreSQL databases on demand")
data = Blueprint("data", __name__, description="Snapshots, clones, resets, templates, dumps and restores")
quota = Blueprint("quota", __name__, description="The tenant's share of the service: quota and plans")
health = Blueprint("health", __name__, description="Liveness and readiness of the service")
tls = Blueprint("tls", __name__, description="The certificate authority that signs every database server's certificate")

_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "The database's URL"}}


def _guarded(blueprint: Blueprint, costly: bool = False):
    """Documents what authentication adds to an operation, and marks (and
    documents) one that costs the service work: only those count against the
    token's rate limit (``_authenticate``)."""

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
    """Whether the request's operation is marked costly by ``_guarded``."""
    view_class = getattr(current_app.view_functions.get(request.endpoint), "view_class", None)
    return getattr(getattr(view_class, request.method.lower(), None), "costly", False)


def _services():
    return current_app.extensions["dbprov"]


def _principal() -> Principal:
    return g.principal


def _present(record: Database, credentials: Credentials | None = None) -> dict[str, Any]:
    values = {column.key: getattr(record, column.key) for column in LISTED}
    return _body(values, _services().databases.host(record), credentials)


def _body(values: Mapping[str, Any], host: str, credentials: Credentials | None = None) -> dict[str, Any]:
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
        "expires_at": values["expires_at"],
        "protected": values["protected"],
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
    if record.status == Status.LOST:
        raise DataLost(f"database {record.id} is lost: {record.last_error}", database_id=record.id)
    return 202 if record.status in COMING_UP else success


def _wait(services, principal: Principal, record: Database, headers: dict[str, str]) -> Database:
    """Wait for readiness as the request's Prefer header asks (RFC 7240)."""
    asynchronous, wait = _preferences()
    if asynchronous:
        headers["Preference-Applied"] = "respond-async"
        return record
    if record.status not in COMING_UP:
        return record  # settled already (a warm claim): nothing to read again
    timeout = services.settings.request_timeout
    return services.databases.wait_until_settled(
        principal, record.id, min(timeout, wait) if wait is not None else timeout
    )


@databases.before_request
@data.before_request
@quota.before_request
def _authenticate() -> None:
    services = _services()
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


@databases.before_request
@data.before_request
def _require_json_body() -> None:
    # webargs reads a body only when it is declared JSON, and would otherwise
    # treat it as empty: a form or text body must be refused, not ignored.
    if request.endpoint == "data.DatabaseRestore":
        return  # an archive, streamed to disk by its view, never read whole here
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
        page = _services().databases.list(
            _principal(), status, query["page"], query["page_size"], query.get("cursor")
        )
        host = _services().databases.host
        # Serialised here rather than by the schema, which it matches (a test
        # checks): a page of 50 through marshmallow took half the request.
        # orjson writes an aware time as isoformat() does, several times faster.
        return Response(orjson.dumps({
            "items": [_body(row._mapping, host(row)) for row in page.items],
            "page": page.page,
            "page_size": page.page_size,
            "total": page.total,
            "next_cursor": page.next_cursor,
        }), mimetype="application/json")

    @databases.arguments(DatabaseCreateSchema, required=False)
    @_guarded(databases, costly=True)
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
        description="Over the tenant's quota or its share of the host ports (type ...:quota-exceeded), "
        "or a superuser role that the service does not allow",
    )
    @databases.alt_response(
        409, response="CONFLICT",
        description="The name is taken",
    )
    @databases.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    @databases.alt_response(
        422, response="UNPROCESSABLE_ENTITY",
        description="Invalid body (the schema's rules, and those its description states), or the "
        "version's image is missing and cannot be pulled (type ...:image-missing, naming the image)",
    )
    @databases.alt_response(423, response="DEFAULT_ERROR",
                            description="The template named is being built by another client; ask again")
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
        # No body at all asks for the defaults.
        body = body or CreateRequest()
        record = services.databases.create(principal, body, _idempotency(body.body()))
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
        domain = _services().databases
        row = domain.show(_principal(), database_id)
        # Written as a page of the list is (see there), which it matches.
        return Response(orjson.dumps(_body(row._mapping, domain.host(row))), mimetype="application/json")

    @databases.arguments(DatabaseUpdateSchema)
    @_guarded(databases)
    @databases.response(200, DatabaseSchema)
    @databases.alt_response(403, response="FORBIDDEN", description="Removing the expiry, where DBPROV_MAX_TTL forbids it")
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is being deleted")
    @databases.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    @databases.alt_response(422, response="UNPROCESSABLE_ENTITY")
    def patch(self, body, database_id):
        """Renew or remove a database's expiry, or set its protection"""
        return _present(_services().databases.update(_principal(), database_id, body))

    @_guarded(databases)
    @databases.response(202, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is protected")
    def delete(self, database_id):
        """Delete a database: its container and volume are removed and its port freed"""
        return _present(_services().databases.delete(_principal(), database_id))


@databases.route("/databases/<string:database_id>/stop")
class DatabaseStop(MethodView):
    @_guarded(databases, costly=True)
    @databases.response(202, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is not ready")
    def post(self, database_id):
        """Stop a database's server: its data, port and password are kept, its memory freed"""
        return _present(_services().databases.stop(_principal(), database_id))


@databases.route("/databases/<string:database_id>/start")
class DatabaseStart(MethodView):
    @_guarded(databases, costly=True)
    @databases.response(200, DatabaseSchema)
    @databases.alt_response(
        202, schema=DatabaseSchema, success=True,
        description="Accepted: still starting (asked with Prefer: respond-async, or the wait ran out)",
    )
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT",
                            description="The database is neither stopped nor failed with its data kept")
    @databases.alt_response(410, response="GONE",
                            description="Its data was removed outside dbprov: the database is lost (type ...:data-lost)")
    @databases.alt_response(502, response="BAD_GATEWAY", description="The server did not come back")
    @databases.alt_response(503, response="SERVICE_UNAVAILABLE",
                            description="A failed database's new port: none is free; see Retry-After")
    def post(self, database_id):
        """Start a stopped database, or a failed one whose data is kept (on a new port), and unless
        asked not to, wait until it accepts connections"""
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
    @databases.alt_response(404, response="NOT_FOUND", description="No such database, or a deleted one")
    def get(self, database_id):
        """Show a database's user, password and connection URI"""
        return _credentials_body(_services().databases.live_credentials(_principal(), database_id))


@databases.route("/databases/<string:database_id>/credentials/rotate")
class CredentialsRotation(MethodView):
    @_guarded(databases, costly=True)
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


def _snapshot_body(snapshot) -> dict[str, Any]:
    return {
        "id": snapshot.id, "tenant": snapshot.tenant, "database_id": snapshot.database_id,
        "status": snapshot.status.value, "version": snapshot.version, "size_bytes": snapshot.size_bytes,
        "last_error": snapshot.last_error, "created_at": snapshot.created_at, "ready_at": snapshot.ready_at,
    }


def _template_body(template, database: Database | None = None) -> dict[str, Any]:
    body = {
        "id": template.id, "key": template.key, "version": template.version,
        "status": template.status.value, "pool_size": template.pool_size,
        "snapshot_id": template.snapshot_id, "created_at": template.created_at,
        "ready_at": template.ready_at, "database": None,
    }
    if database is not None:
        body["database"] = _present(database, _services().databases.credentials(database))
    return body


@data.route("/databases/<string:database_id>/snapshots")
class DatabaseSnapshots(MethodView):
    @_guarded(data, costly=True)
    @data.response(201, SnapshotSchema)
    @data.alt_response(202, schema=SnapshotSchema, success=True,
                       description="Accepted: still being taken (respond-async, or the wait ran out)")
    @data.alt_response(403, response="FORBIDDEN", description="Over DBPROV_SNAPSHOT_QUOTA")
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="The database is neither ready nor stopped")
    def post(self, database_id):
        """Take a consistent snapshot of a database (a clean stop of a second or so, a copy, a start)"""
        services = _services()
        principal = _principal()
        snapshot = services.snapshots.take(principal, database_id)
        headers = {"Location": url_for("data.SnapshotItem", snapshot_id=snapshot.id)}
        asynchronous, wait = _preferences()
        if asynchronous:
            headers["Preference-Applied"] = "respond-async"
        else:
            timeout = services.settings.request_timeout
            snapshot = services.snapshots.wait_until_settled(
                principal, snapshot.id, min(timeout, wait) if wait is not None else timeout
            )
        return _snapshot_body(snapshot), 201 if snapshot.status.value == "ready" else 202, headers


@data.route("/snapshots")
class SnapshotCollection(MethodView):
    @_guarded(data)
    @data.response(200, SnapshotListSchema)
    def get(self):
        """The tenant's snapshots, newest first"""
        return {"items": [_snapshot_body(s) for s in _services().snapshots.list(_principal())]}


@data.route("/snapshots/<string:snapshot_id>")
class SnapshotItem(MethodView):
    @_guarded(data)
    @data.response(200, SnapshotSchema)
    @data.alt_response(404, response="NOT_FOUND")
    def get(self, snapshot_id):
        """A snapshot: its status, size and time"""
        return _snapshot_body(_services().snapshots.get(_principal(), snapshot_id))

    @_guarded(data)
    @data.response(202, SnapshotSchema)
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="It belongs to a template")
    def delete(self, snapshot_id):
        """Delete a snapshot and its data"""
        return _snapshot_body(_services().snapshots.delete(_principal(), snapshot_id))


@data.route("/databases/<string:database_id>/reset")
class DatabaseReset(MethodView):
    @data.arguments(ResetSchema, required=False)
    @_guarded(data, costly=True)
    @data.response(200, DatabaseSchema)
    @data.alt_response(202, schema=DatabaseSchema, success=True,
                       description="Accepted: still resetting (respond-async, or the wait ran out)")
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT",
                       description="No snapshot to go back to, another version's, or not ready or stopped")
    @data.alt_response(502, response="BAD_GATEWAY", description="The server did not come back")
    def post(self, body, database_id):
        """Put a database back to a snapshot, keeping its URI and password; answers once SELECT 1 works"""
        services = _services()
        principal = _principal()
        record = services.snapshots.reset(principal, database_id, (body or {}).get("snapshot"))
        headers: dict[str, str] = {}
        record = _wait(services, principal, record, headers)
        return _present(record), _settled_answer(record, 200), headers


@data.route("/databases/<string:database_id>/dump")
class DatabaseDump(MethodView):
    @data.arguments(DumpQuerySchema, location="query", unknown=RAISE)
    # A read that costs like a write (a job, and the server's work), and one
    # of the tenant's DBPROV_TENANT_TRANSFERS.
    @_guarded(data, costly=True)
    @data.response(200, {"type": "string", "format": "binary"}, content_type="application/octet-stream",
                   description="A pg_dump custom-format archive")
    @data.alt_response(404, response="NOT_FOUND", description="No such database, or none of that name inside it")
    @data.alt_response(409, response="CONFLICT", description="The database is not ready")
    @data.alt_response(422, response="UNPROCESSABLE_ENTITY")
    @data.alt_response(429, response="TOO_MANY_REQUESTS",
                       description="The tenant already runs DBPROV_TENANT_TRANSFERS dumps and restores")
    @data.alt_response(502, response="BAD_GATEWAY", description="The server did not list its databases")
    def get(self, query, database_id):
        """Stream a pg_dump archive (custom format) of a database of the server, made beside it"""
        name = query.get("database")
        chunks = _services().dumps.dump(_principal(), database_id, name)
        return Response(
            chunks, mimetype="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{database_id}{"-" + name if name else ""}.dump"'},
        )


@data.route("/databases/<string:database_id>/globals")
class DatabaseGlobals(MethodView):
    # Like a dump: a job beside the server, one of the tenant's DBPROV_TENANT_TRANSFERS.
    @_guarded(data, costly=True)
    @data.response(200, {"type": "string"}, content_type="application/sql",
                   description="pg_dumpall --globals-only --no-role-passwords, as the tenant")
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="The database is not ready")
    @data.alt_response(429, response="TOO_MANY_REQUESTS",
                       description="The tenant already runs DBPROV_TENANT_TRANSFERS dumps and restores")
    def get(self, database_id):
        """The server's roles and their settings as SQL, without passwords (the tenant cannot read them)"""
        return Response(_services().dumps.dump(_principal(), database_id, globals_only=True), mimetype="application/sql")


@data.route("/databases/<string:database_id>/contents")
class DatabaseContents(MethodView):
    @_guarded(data)
    @data.response(200, ServerDatabaseListSchema)
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="The database is not ready")
    @data.alt_response(502, response="BAD_GATEWAY", description="The server did not list its databases")
    def get(self, database_id):
        """The databases inside the server that the tenant may connect to, with their sizes"""
        return {"items": _services().dumps.contents(_principal(), database_id)}


@data.route("/databases/<string:database_id>/restore")
class DatabaseRestore(MethodView):
    @data.arguments(RestoreQuerySchema, location="query", unknown=RAISE)
    @_guarded(data, costly=True)
    @data.doc(requestBody={
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}}},
        "description": "A pg_dump custom-format archive, at most DBPROV_RESTORE_MAX_BYTES",
    })
    @data.response(200, DatabaseSchema)
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="The database is not ready, or not empty")
    @data.alt_response(413, response="DEFAULT_ERROR", description="Larger than DBPROV_RESTORE_MAX_BYTES")
    @data.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    @data.alt_response(422, response="UNPROCESSABLE_ENTITY",
                       description="Not an archive pg_restore takes; the database is left as it was")
    @data.alt_response(429, response="TOO_MANY_REQUESTS",
                       description="Over the write requests per minute, or the tenant already runs "
                       "DBPROV_TENANT_TRANSFERS dumps and restores, or the service DBPROV_RESTORES restores")
    @data.alt_response(502, response="BAD_GATEWAY",
                       description="The server did not say whether the database is empty; nothing was restored")
    @data.alt_response(504, response="GATEWAY_TIMEOUT",
                       description="pg_restore ran past DBPROV_RESTORE_TIMEOUT and was rolled back: "
                       "the database is as it was, and the same archive would time out again")
    @data.alt_response(507, response="INSUFFICIENT_STORAGE",
                       description="The service's disk has no room for the archive now; nothing was restored")
    def post(self, query, database_id):
        """Restore a pg_dump archive into an empty database of the server, in one transaction"""
        services = _services()
        if request.mimetype != "application/octet-stream":
            raise UnsupportedMediaType("the body must be application/octet-stream: a pg_dump archive")
        request.max_content_length = services.settings.restore_max_bytes
        record = services.dumps.restore(
            _principal(), database_id, request.stream, request.content_length, query.get("database")
        )
        return _present(record)


@data.route("/templates")
class TemplateCollection(MethodView):
    @_guarded(data)
    @data.response(200, TemplateListSchema)
    def get(self):
        """The tenant's templates"""
        return {"items": [_template_body(t) for t in _services().templates.list(_principal())]}

    @data.arguments(TemplateCreateSchema)
    @_guarded(data, costly=True)
    @data.response(201, TemplateSchema)
    @data.alt_response(200, schema=TemplateSchema, success=True,
                       description="The template is ready: create databases with it")
    @data.alt_response(202, schema=TemplateSchema, success=True,
                       description="Its database is still being provisioned (respond-async, or the wait ran out)")
    @data.alt_response(423, response="DEFAULT_ERROR", description="Another client is building it; ask again")
    @data.alt_response(
        403, response="FORBIDDEN",
        description="A new key past DBPROV_TENANT_TEMPLATES, or its database over the tenant's quota "
        "(type ...:quota-exceeded)",
    )
    @data.alt_response(422, response="UNPROCESSABLE_ENTITY")
    def post(self, body):
        """Start a template for a key (a database to fill, 201), or find it ready (200); a key
        whose build failed or was abandoned gets a fresh build to fill"""
        services = _services()
        principal = _principal()
        template, database = services.templates.begin(principal, body["key"], body.get("version"))
        if database is None:
            return _template_body(template), 200
        headers = {"Location": url_for("data.TemplateItem", key=template.key)}
        database = _wait(services, principal, database, headers)
        return _template_body(template, database), _settled_answer(database, 201), headers


@data.route("/templates/<string:key>")
class TemplateItem(MethodView):
    @_guarded(data)
    @data.response(200, TemplateSchema)
    @data.alt_response(404, response="NOT_FOUND")
    def get(self, key):
        """A template and its state"""
        return _template_body(_services().templates.get(_principal(), key))

    @_guarded(data)
    @data.response(202, TemplateSchema)
    @data.alt_response(404, response="NOT_FOUND")
    def delete(self, key):
        """Delete a template: its snapshot, its database and its warm pool go"""
        return _template_body(_services().templates.delete(_principal(), key))


@data.route("/templates/<string:key>/finalize")
class TemplateFinalize(MethodView):
    @data.arguments(TemplateFinalizeSchema, required=False)
    @_guarded(data, costly=True)
    @data.response(200, TemplateSchema)
    @data.alt_response(202, schema=TemplateSchema, success=True,
                       description="Accepted: its snapshot is still being taken")
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="Not being built, or its database is not ready")
    @data.alt_response(
        403, response="FORBIDDEN",
        description="A warm pool that does not fit in the tenant's quota (type ...:quota-exceeded)",
    )
    def post(self, body, key):
        """Finish a template: a snapshot of its database, from which every clone is made"""
        services = _services()
        principal = _principal()
        template = services.templates.finalize(principal, key, (body or {}).get("pool_size", 0))
        asynchronous, wait = _preferences()
        if not asynchronous:
            timeout = services.settings.request_timeout
            template = services.templates.wait_until_settled(
                principal, key, min(timeout, wait) if wait is not None else timeout
            )
        return _template_body(template), 200 if template.status.value == "ready" else 202


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
    # A token is not needed; an admin's shows why a check fails.
    @health.doc(security=[{}, {"bearerAuth": []}])
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
        # The engine's and the store's own words name hosts, users, paths and
        # registries: for admins only. Others learn what fails, not why.
        details = _sees_readiness_details(services, checks["metadata"] == "ok")
        failing = [name for name, result in checks.items() if result != "ok"]
        if not details:
            checks = {name: "unavailable" if name in failing else "ok" for name in checks}
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
        if not details:
            images = {version: state.partition(":")[0] for version, state in images.items()}
        # A missing image takes only its version out of service, not the API:
        # "degraded" says so without failing a load balancer's check.
        status = "ok" if all(state == "available" for state in images.values()) else "degraded"
        return {"status": status, "checks": checks, "images": images}


@tls.route("/ca.pem")
class CertificateAuthority(MethodView):
    # Public, as a CA's certificate is: clients check servers with it.
    @tls.doc(security=[])
    @tls.response(200, {"type": "string"}, content_type="application/x-pem-file",
                  description="The CA's certificate (PEM), for sslmode=verify-full with sslrootcert")
    @tls.alt_response(503, response="SERVICE_UNAVAILABLE", description="The metadata store is unreachable")
    def get(self):
        """The certificate of the CA that signs every database server's certificate"""
        return Response(_services().authority.certificate_pem(), mimetype="application/x-pem-file")


def _sees_readiness_details(services, store_up: bool) -> bool:
    """Whether the caller is an admin: with --no-auth everyone is; otherwise a
    caller whose admin token the store can check (no token is asked for)."""
    if not services.auth_required:
        return True
    if not store_up or not request.headers.get("Authorization"):
        return False
    try:
        return services.tenants.authenticate(request.headers["Authorization"]).admin
    except DbprovError:
        return False
