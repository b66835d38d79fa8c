"""A database's data: snapshots and resets, dumps, restores and contents, and templates to clone from."""

from __future__ import annotations

from typing import Any

from flask import Response, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import RAISE
from werkzeug.exceptions import UnsupportedMediaType

from ..domain.models import Database
from .common import (
    authenticate,
    current_principal,
    current_services,
    guarded,
    preferences,
    present,
    require_json_body,
    settled_answer,
    wait_as_preferred,
)
from .schemas import (
    DatabaseSchema,
    DumpQuerySchema,
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

data = Blueprint("data", __name__, description="Snapshots, clones, resets, templates, dumps and restores")
data.before_request(authenticate)
data.before_request(require_json_body)


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
        body["database"] = present(database, current_services().databases.credentials(database))
    return body


@data.route("/databases/<string:database_id>/snapshots")
class DatabaseSnapshots(MethodView):
    @guarded(data, costly=True)
    @data.response(201, SnapshotSchema)
    @data.alt_response(202, schema=SnapshotSchema, success=True,
                       description="Accepted: still being taken (respond-async, or the wait ran out)")
    @data.alt_response(403, response="FORBIDDEN", description="Over DBPROV_SNAPSHOT_QUOTA")
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="The database is neither ready nor stopped")
    def post(self, database_id):
        """Take a consistent snapshot of a database (a clean stop of a second or so, a copy, a start)"""
        services = current_services()
        principal = current_principal()
        snapshot = services.snapshots.take(principal, database_id)
        headers = {"Location": url_for("data.SnapshotItem", snapshot_id=snapshot.id)}
        asynchronous, wait = preferences()
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
    @guarded(data)
    @data.response(200, SnapshotListSchema)
    def get(self):
        """The tenant's snapshots, newest first"""
        return {"items": [_snapshot_body(s) for s in current_services().snapshots.list(current_principal())]}


@data.route("/snapshots/<string:snapshot_id>")
class SnapshotItem(MethodView):
    @guarded(data)
    @data.response(200, SnapshotSchema)
    @data.alt_response(404, response="NOT_FOUND")
    def get(self, snapshot_id):
        """A snapshot: its status, size and time"""
        return _snapshot_body(current_services().snapshots.get(current_principal(), snapshot_id))

    @guarded(data)
    @data.response(202, SnapshotSchema)
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="It belongs to a template")
    def delete(self, snapshot_id):
        """Delete a snapshot and its data"""
        return _snapshot_body(current_services().snapshots.delete(current_principal(), snapshot_id))


@data.route("/databases/<string:database_id>/reset")
class DatabaseReset(MethodView):
    @data.arguments(ResetSchema, required=False)
    @guarded(data, costly=True)
    @data.response(200, DatabaseSchema)
    @data.alt_response(202, schema=DatabaseSchema, success=True,
                       description="Accepted: still resetting (respond-async, or the wait ran out)")
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT",
                       description="No snapshot to go back to, another version's, or not ready or stopped")
    @data.alt_response(502, response="BAD_GATEWAY", description="The server did not come back")
    def post(self, body, database_id):
        """Put a database back to a snapshot, keeping its URI and password; answers once SELECT 1 works"""
        services = current_services()
        principal = current_principal()
        record = services.snapshots.reset(principal, database_id, (body or {}).get("snapshot"))
        headers: dict[str, str] = {}
        record = wait_as_preferred(services, principal, record, headers)
        return present(record), settled_answer(record, 200), headers


@data.route("/databases/<string:database_id>/dump")
class DatabaseDump(MethodView):
    @data.arguments(DumpQuerySchema, location="query", unknown=RAISE)
    # A read that costs like a write (a job, and the server's work), and one
    # of the tenant's DBPROV_TENANT_TRANSFERS.
    @guarded(data, costly=True)
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
        chunks = current_services().dumps.dump(current_principal(), database_id, name)
        return Response(
            chunks, mimetype="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{database_id}{"-" + name if name else ""}.dump"'},
        )


@data.route("/databases/<string:database_id>/globals")
class DatabaseGlobals(MethodView):
    # Like a dump: a job beside the server, one of the tenant's DBPROV_TENANT_TRANSFERS.
    @guarded(data, costly=True)
    @data.response(200, {"type": "string"}, content_type="application/sql",
                   description="pg_dumpall --globals-only --no-role-passwords, as the tenant")
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="The database is not ready")
    @data.alt_response(429, response="TOO_MANY_REQUESTS",
                       description="The tenant already runs DBPROV_TENANT_TRANSFERS dumps and restores")
    def get(self, database_id):
        """The server's roles and their settings as SQL, without passwords (the tenant cannot read them)"""
        return Response(current_services().dumps.dump(current_principal(), database_id, globals_only=True), mimetype="application/sql")


@data.route("/databases/<string:database_id>/contents")
class DatabaseContents(MethodView):
    @guarded(data)
    @data.response(200, ServerDatabaseListSchema)
    @data.alt_response(404, response="NOT_FOUND")
    @data.alt_response(409, response="CONFLICT", description="The database is not ready")
    @data.alt_response(502, response="BAD_GATEWAY", description="The server did not list its databases")
    def get(self, database_id):
        """The databases inside the server that the tenant may connect to, with their sizes"""
        return {"items": current_services().dumps.contents(current_principal(), database_id)}


@data.route("/databases/<string:database_id>/restore")
class DatabaseRestore(MethodView):
    @data.arguments(RestoreQuerySchema, location="query", unknown=RAISE)
    @guarded(data, costly=True)
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
        services = current_services()
        if request.mimetype != "application/octet-stream":
            raise UnsupportedMediaType("the body must be application/octet-stream: a pg_dump archive")
        request.max_content_length = services.settings.restore_max_bytes
        record = services.dumps.restore(
            current_principal(), database_id, request.stream, request.content_length, query.get("database")
        )
        return present(record)


@data.route("/templates")
class TemplateCollection(MethodView):
    @guarded(data)
    @data.response(200, TemplateListSchema)
    def get(self):
        """The tenant's templates"""
        return {"items": [_template_body(t) for t in current_services().templates.list(current_principal())]}

    @data.arguments(TemplateCreateSchema)
    @guarded(data, costly=True)
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
        services = current_services()
        principal = current_principal()
        template, database = services.templates.begin(principal, body["key"], body.get("version"))
        if database is None:
            return _template_body(template), 200
        headers = {"Location": url_for("data.TemplateItem", key=template.key)}
        database = wait_as_preferred(services, principal, database, headers)
        return _template_body(template, database), settled_answer(database, 201), headers


@data.route("/templates/<string:key>")
class TemplateItem(MethodView):
    @guarded(data)
    @data.response(200, TemplateSchema)
    @data.alt_response(404, response="NOT_FOUND")
    def get(self, key):
        """A template and its state"""
        return _template_body(current_services().templates.get(current_principal(), key))

    @guarded(data)
    @data.response(202, TemplateSchema)
    @data.alt_response(404, response="NOT_FOUND")
    def delete(self, key):
        """Delete a template: its snapshot, its database and its warm pool go"""
        return _template_body(current_services().templates.delete(current_principal(), key))


@data.route("/templates/<string:key>/finalize")
class TemplateFinalize(MethodView):
    @data.arguments(TemplateFinalizeSchema, required=False)
    @guarded(data, costly=True)
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
        services = current_services()
        principal = current_principal()
        template = services.templates.finalize(principal, key, (body or {}).get("pool_size", 0))
        asynchronous, wait = preferences()
        if not asynchronous:
            timeout = services.settings.request_timeout
            template = services.templates.wait_until_settled(
                principal, key, min(timeout, wait) if wait is not None else timeout
            )
        return _template_body(template), 200 if template.status.value == "ready" else 202
