"""The databases resource: create, list, show, renew, delete, stop and start, credentials, events and logs."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import orjson
from flask import Response, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import RAISE

from ..domain.databases import Credentials
from ..domain.models import Status
from ..domain.requests import CreateRequest, Idempotency
from ..errors import ValidationError
from .common import (
    authenticate,
    current_principal,
    current_services,
    database_body,
    guarded,
    present,
    require_json_body,
    settled_answer,
    wait_as_preferred,
)
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
    LogQuerySchema,
)

databases = Blueprint("databases", __name__, description="PostgreSQL databases on demand")
databases.before_request(authenticate)
databases.before_request(require_json_body)

_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "The database's URL"}}


def _credentials_body(credentials: Credentials) -> dict[str, Any]:
    return {
        "username": credentials.username,
        "password": credentials.password,
        "database": credentials.database,
        "host": credentials.host,
        "port": credentials.port,
        "connection_uri": credentials.connection_uri,
    }


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


@databases.route("/databases")
class DatabaseCollection(MethodView):
    # unknown=RAISE: a misspelt filter is an error, not silently "everything".
    @databases.arguments(DatabaseListQuerySchema, location="query", unknown=RAISE)
    @guarded(databases)
    @databases.response(200, DatabasePageSchema)
    def get(self, query):
        """List databases, newest first"""
        status = Status(query["status"]) if query.get("status") else None
        page = current_services().databases.list(
            current_principal(), status, query["page"], query["page_size"], query.get("cursor")
        )
        host = current_services().databases.host
        # Serialised here rather than by the schema, which it matches (a test
        # checks): a page of 50 through marshmallow took half the request.
        # orjson writes an aware time as isoformat() does, several times faster.
        return Response(orjson.dumps({
            "items": [database_body(row._mapping, host(row)) for row in page.items],
            "page": page.page,
            "page_size": page.page_size,
            "total": page.total,
            "next_cursor": page.next_cursor,
        }), mimetype="application/json")

    @databases.arguments(DatabaseCreateSchema, required=False)
    @guarded(databases, costly=True)
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
        services = current_services()
        principal = current_principal()
        # No body at all asks for the defaults.
        body = body or CreateRequest()
        record = services.databases.create(principal, body, _idempotency(body.body()))
        headers = {"Location": url_for("databases.DatabaseItem", database_id=record.id)}
        record = wait_as_preferred(services, principal, record, headers)
        status = settled_answer(record, 201)
        return present(record, services.databases.credentials(record)), status, headers


@databases.route("/databases/<string:database_id>")
class DatabaseItem(MethodView):
    @guarded(databases)
    @databases.response(200, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, database_id):
        """Show a database (without its password)"""
        domain = current_services().databases
        row = domain.show(current_principal(), database_id)
        # Written as a page of the list is (see there), which it matches.
        return Response(orjson.dumps(database_body(row._mapping, domain.host(row))), mimetype="application/json")

    @databases.arguments(DatabaseUpdateSchema)
    @guarded(databases)
    @databases.response(200, DatabaseSchema)
    @databases.alt_response(403, response="FORBIDDEN", description="Removing the expiry, where DBPROV_MAX_TTL forbids it")
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is being deleted")
    @databases.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    @databases.alt_response(422, response="UNPROCESSABLE_ENTITY")
    def patch(self, body, database_id):
        """Renew or remove a database's expiry, or set its protection"""
        return present(current_services().databases.update(current_principal(), database_id, body))

    @guarded(databases)
    @databases.response(202, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is protected")
    def delete(self, database_id):
        """Delete a database: its container and volume are removed and its port freed"""
        return present(current_services().databases.delete(current_principal(), database_id))


@databases.route("/databases/<string:database_id>/stop")
class DatabaseStop(MethodView):
    @guarded(databases, costly=True)
    @databases.response(202, DatabaseSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is not ready")
    def post(self, database_id):
        """Stop a database's server: its data, port and password are kept, its memory freed"""
        return present(current_services().databases.stop(current_principal(), database_id))


@databases.route("/databases/<string:database_id>/start")
class DatabaseStart(MethodView):
    @guarded(databases, costly=True)
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
        services = current_services()
        principal = current_principal()
        record = services.databases.start(principal, database_id)
        headers: dict[str, str] = {}
        record = wait_as_preferred(services, principal, record, headers)
        return present(record), settled_answer(record, 200), headers


@databases.route("/databases/<string:database_id>/events")
class DatabaseEvents(MethodView):
    @databases.arguments(EventQuerySchema, location="query", unknown=RAISE)
    @guarded(databases)
    @databases.response(200, EventListSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, query, database_id):
        """A database's events, oldest first: what happened, when, and who did it"""
        return {"items": current_services().databases.events(current_principal(), database_id, **query)}


@databases.route("/events")
class Events(MethodView):
    @databases.arguments(EventQuerySchema, location="query", unknown=RAISE)
    @guarded(databases)
    @databases.response(200, EventListSchema)
    @databases.alt_response(403, response="FORBIDDEN", description="Not an admin token")
    def get(self, query):
        """Events of every database, oldest first (admin tokens only)"""
        return {"items": current_services().databases.events(current_principal(), None, **query)}


@databases.route("/databases/<string:database_id>/logs")
class DatabaseLogs(MethodView):
    @databases.arguments(LogQuerySchema, location="query", unknown=RAISE)
    @guarded(databases)
    @databases.response(
        200, {"type": "string"}, content_type="text/plain",
        description="The last lines of the server's log",
    )
    @databases.alt_response(404, response="NOT_FOUND")
    def get(self, query, database_id):
        """The last lines of a database's server log, as text"""
        text = current_services().databases.logs(current_principal(), database_id, query["tail"])
        return Response(text, mimetype="text/plain")


@databases.route("/databases/<string:database_id>/credentials")
class DatabaseCredentials(MethodView):
    @guarded(databases)
    @databases.response(200, CredentialsSchema)
    @databases.alt_response(404, response="NOT_FOUND", description="No such database, or a deleted one")
    def get(self, database_id):
        """Show a database's user, password and connection URI"""
        return _credentials_body(current_services().databases.live_credentials(current_principal(), database_id))


@databases.route("/databases/<string:database_id>/credentials/rotate")
class CredentialsRotation(MethodView):
    @guarded(databases, costly=True)
    @databases.response(200, CredentialsSchema)
    @databases.alt_response(404, response="NOT_FOUND")
    @databases.alt_response(409, response="CONFLICT", description="The database is not ready")
    @databases.alt_response(502, response="BAD_GATEWAY", description="The server refused; the old password still works")
    def post(self, database_id):
        """Give the database's user a new password; the old one stops working at once"""
        _record, credentials = current_services().databases.rotate_password(current_principal(), database_id)
        return _credentials_body(credentials)
