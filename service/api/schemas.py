"""Request and response bodies; the OpenAPI document is generated from these."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from ..domain.models import Status
from ..domain.requests import NAME_PATTERN, CreateRequest

STATUSES = [s.value for s in Status]


class StrictBoolean(fields.Boolean):
    """JSON true or false only: 0, 1, "yes" and friends are refused, not guessed at."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


_VERSION = dict(
    validate=validate.Regexp(r"^[0-9]{1,3}$", error="Must be a PostgreSQL major version."),
    metadata={
        "description": "PostgreSQL major version; the default is the service's "
        "DBPROV_DEFAULT_VERSION. One the service does not offer (GET /readyz lists them) is "
        "refused with 422 naming the supported ones.",
        "example": "17",
    },
)
_SOURCE_ID = dict(validate=validate.Regexp(r"^[0-9a-f]{12}$", error="Must be an id."))


class AwareDateTime(fields.AwareDateTime):
    """An RFC 3339 time with its offset: a bare local time would be a guess."""

    def __init__(self, **kwargs):
        super().__init__(format="iso", **kwargs)


_TTL = dict(
    validate=validate.Range(min=1, max=10 * 365 * 86400),
    metadata={
        "description": "Seconds from now until the database is deleted by itself; renew it "
        "with PATCH. At most DBPROV_MAX_TTL when the service sets one. Not together with "
        "expires_at (422).",
        "example": 3600,
    },
)
_EXPIRES_AT = dict(
    metadata={"description": "When the database is deleted by itself (RFC 3339, with offset). "
                             "Not together with ttl (422)."},
)
_IDLE_STOP = dict(
    allow_none=True,
    validate=validate.Range(min=1, max=10 * 365 * 86400),
    metadata={
        "description": "Seconds without client sessions (one idle in a transaction counts as a "
        "client; the service's own never do) after which the database sleeps: its server stops "
        "and the service holds its port, and the next connection wakes it with the same URI, "
        "only slower. null: it never sleeps. Left out at create: the plan's, else "
        "DBPROV_IDLE_STOP.",
        "example": 300,
    },
)
_PROTECTED = dict(
    metadata={"description": "Refuse DELETE and expiry (409) while true"},
)


class DatabaseCreateSchema(ma.Schema):
    """What a create may ask for. Rules across fields are said in the fields'
    descriptions: a Meta description would drop the document's
    ``additionalProperties: false`` (apispec writes one or the other)."""

    name = fields.String(
        validate=validate.Regexp(NAME_PATTERN, error="Must match {regex}."),
        metadata={
            "description": "Optional label, unique among databases that are not deleted: "
            "lower-case letters, digits and '-', starting with a letter, at most 63.",
            "example": "orders-ci",
        },
    )
    version = fields.String(**_VERSION)
    superuser = StrictBoolean(
        metadata={
            "description": "Make the tenant's role a superuser; refused (403) unless the "
            "service allows it (DBPROV_ALLOW_SUPERUSER)."
        }
    )
    durable = StrictBoolean(
        metadata={
            "description": "false: the server does not wait for its writes to reach the disk "
            "(fsync and full_page_writes off): creating or dropping a database inside it costs "
            "about half as much. Its data survives a crash "
            "of the server, of the service and a restart of the engine, but a crash of the "
            "machine may lose or corrupt it: for test suites and other data that can be made "
            "again. Default true."
        }
    )
    ttl = fields.Integer(strict=True, **_TTL)
    expires_at = AwareDateTime(**_EXPIRES_AT)
    protected = StrictBoolean(**_PROTECTED)
    idle_stop = fields.Integer(strict=True, **_IDLE_STOP)
    plan = fields.String(
        validate=validate.Regexp(r"^[a-z0-9][a-z0-9_-]{0,62}$", error="Must be a plan name."),
        metadata={"description": "A plan of GET /plans; the default is `default`", "example": "default"},
    )
    parameters = fields.Dict(
        keys=fields.String(validate=validate.Regexp(r"^[a-z_]{1,63}$", error="Must be a setting name.")),
        values=fields.String(validate=validate.Regexp(r"^[^\x00]{1,200}$", error="Must be 1 to 200 characters.")),
        validate=validate.Length(max=32),
        metadata={
            "description": "Database-level settings (ALTER DATABASE ... SET), e.g. work_mem or "
            "statement_timeout; any other setting is refused with 422 naming it",
            "example": {"statement_timeout": "30s"},
        },
    )
    extensions = fields.List(
        fields.String(validate=validate.Regexp(r"^[a-z0-9_-]{1,63}$", error="Must be an extension name.")),
        validate=validate.Length(max=32),
        metadata={
            "description": "Extensions created in the database: PostgreSQL's trusted ones, or "
            "those DBPROV_ALLOWED_EXTENSIONS allows; anything else is refused with 422",
            "example": ["pg_trgm"],
        },
    )
    from_snapshot = fields.String(
        metadata={"description": "A ready snapshot of the tenant's whose data the new database starts "
                                 "with. One source at most: with from_database or template, 422."},
        **_SOURCE_ID,
    )
    from_database = fields.String(
        metadata={
            "description": "One of the tenant's databases: a snapshot of it is taken first (listed "
            "under /snapshots; the clone's own, counted against no quota and deleted with the clone) "
            "and the new database starts with its data. One source at most: with from_snapshot or "
            "template, 422."
        },
        **_SOURCE_ID,
    )
    template = fields.String(
        validate=validate.Regexp(r"^[A-Za-z0-9._:-]{1,255}$", error="Must be a template key."),
        metadata={"description": "The key of a ready template: a clone of it, from its warm pool if it has "
                                 "one. One source at most: with from_snapshot or from_database, 422."},
    )

    @ma.post_load
    def _request(self, data: dict, **_: object) -> CreateRequest:
        return CreateRequest(**data)


class DatabaseUpdateSchema(ma.Schema):
    """What PATCH may change: the expiry (renew it, or remove it with expires_at null),
    protection and the idle stop."""

    ttl = fields.Integer(strict=True, **_TTL)
    expires_at = AwareDateTime(allow_none=True, **_EXPIRES_AT)
    protected = StrictBoolean(**_PROTECTED)
    idle_stop = fields.Integer(strict=True, **_IDLE_STOP)


class DatabaseSchema(ma.Schema):
    """A database as anyone may see it: no password."""

    id = fields.String(required=True)
    tenant = fields.String(required=True)
    name = fields.String(allow_none=True)
    status = fields.String(
        required=True,
        validate=validate.OneOf(STATUSES),
        metadata={
            "description": "pending, provisioning, ready, failed, stopping, stopped, starting, "
            "resetting, deleting, deleted; sleeping (idle for its idle_stop: the next connection "
            "wakes it, where stopped refuses connections until POST .../start) and waking; lost; "
            "or unavailable (the machine holding it is away; last_error says which, and it is "
            "ready again once that machine is back)"
        },
    )
    version = fields.String(required=True)
    image = fields.String(required=True)
    host = fields.String(required=True, metadata={"description": "Host name clients connect to"})
    port = fields.Integer(
        allow_none=True, metadata={"description": "Published host port; null once released"}
    )
    database = fields.String(required=True)
    username = fields.String(required=True)
    superuser = fields.Boolean(required=True)
    durable = fields.Boolean(
        required=True, metadata={"description": "false: a crash of the machine may lose its data"}
    )
    last_error = fields.String(
        allow_none=True, metadata={"description": "Why it failed, with the container's log"}
    )
    phase_timings = fields.Dict(
        keys=fields.String(),
        values=fields.Float(),
        metadata={"description": "Seconds each provisioning phase took (create, start, ready)"},
    )
    expires_at = fields.DateTime(allow_none=True, metadata={"description": "When it is deleted by itself"})
    protected = fields.Boolean(required=True)
    idle_stop = fields.Float(
        allow_none=True, metadata={"description": "Seconds without clients after which it sleeps; null: never"}
    )
    plan = fields.String(required=True)
    parameters = fields.Dict(keys=fields.String(), values=fields.String())
    extensions = fields.List(fields.String())
    source_snapshot_id = fields.String(
        allow_none=True, metadata={"description": "The snapshot its data was copied from"}
    )
    created_at = fields.DateTime(required=True)
    ready_at = fields.DateTime(allow_none=True)
    deleted_at = fields.DateTime(allow_none=True)


class CredentialsSchema(ma.Schema):
    username = fields.String(required=True)
    password = fields.String(required=True)
    database = fields.String(required=True)
    host = fields.String(required=True)
    port = fields.Integer(allow_none=True)
    connection_uri = fields.String(
        allow_none=True,
        metadata={"example": "postgresql://app:secret@localhost:15432/app"},
    )


class DatabaseWithCredentialsSchema(DatabaseSchema):
    """The answer to a create: the only time the password comes with the database."""

    password = fields.String(required=True)
    connection_uri = fields.String(allow_none=True)


class DatabaseListQuerySchema(ma.Schema):
    status = fields.String(validate=validate.OneOf(STATUSES))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))
    page_size = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(
        validate=validate.Regexp(r"^[A-Za-z0-9_-]{1,200}$", error="Must be a next_cursor."),
        metadata={"description": "A page's next_cursor: the page after it (faster than page numbers deep in a long list)"},
    )


class DatabasePageSchema(ma.Schema):
    items = fields.List(fields.Nested(DatabaseSchema), required=True)
    page = fields.Integer(required=True)
    page_size = fields.Integer(required=True)
    total = fields.Integer(required=True)
    next_cursor = fields.String(
        allow_none=True, metadata={"description": "Pass as cursor for the next page; null on the last one"}
    )


class EventSchema(ma.Schema):
    id = fields.Integer(required=True)
    database_id = fields.String(required=True)
    tenant = fields.String(required=True)
    at = fields.DateTime(required=True)
    kind = fields.String(
        required=True,
        metadata={
            "description": "requested, claimed, provisioning, retrying, ready, failed, updated, "
            "stopping, stopped, idle-stopped, slept, woken, wake-failed, starting, started, "
            "credentials-rotated, expired, deleting, deleted"
        },
    )
    actor = fields.String(
        required=True, metadata={"description": "token:<id>, local (no authentication) or service"}
    )
    details = fields.Dict()


class EventListSchema(ma.Schema):
    items = fields.List(fields.Nested(EventSchema), required=True)


class EventQuerySchema(ma.Schema):
    since = AwareDateTime(metadata={"description": "Only events at or after this time"})
    until = AwareDateTime(metadata={"description": "Only events before this time"})
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class LogQuerySchema(ma.Schema):
    tail = fields.Integer(load_default=100, validate=validate.Range(min=1, max=10_000))


_INNER_DATABASE = dict(
    validate=validate.Regexp(r"^[A-Za-z0-9_][A-Za-z0-9_$.-]{0,62}$", error="Must be a database name."),
    metadata={"description": "A database inside the server, other than its first (the tenant may make "
                             "more: CREATEDB); the templates are the server's", "example": "app_test"},
)


class DumpQuerySchema(ma.Schema):
    database = fields.String(**_INNER_DATABASE)


class RestoreQuerySchema(ma.Schema):
    database = fields.String(**{
        **_INNER_DATABASE,
        "metadata": {**_INNER_DATABASE["metadata"], "description":
                     "The database to restore into: the server's first by default; made, as the "
                     "tenant's, if the server has none of that name (and gone again if the restore fails)"},
    })


class ServerDatabaseSchema(ma.Schema):
    name = fields.String(required=True, metadata={"example": "app"})
    owner = fields.String(required=True, metadata={"example": "app"})
    bytes = fields.Integer(required=True, metadata={"description": "Its size on disk"})


class ServerDatabaseListSchema(ma.Schema):
    items = fields.List(fields.Nested(ServerDatabaseSchema), required=True)


class PlanSchema(ma.Schema):
    name = fields.String(required=True)
    memory = fields.String(required=True, metadata={"example": "256m"})
    cpus = fields.Float(allow_none=True, metadata={"description": "null: no CPU limit"})
    settings = fields.Dict(keys=fields.String(), values=fields.String())


class PlanListSchema(ma.Schema):
    items = fields.List(fields.Nested(PlanSchema), required=True)


class SnapshotSchema(ma.Schema):
    id = fields.String(required=True)
    tenant = fields.String(required=True)
    database_id = fields.String(required=True, metadata={"description": "The database it is a copy of"})
    status = fields.String(
        required=True, metadata={"description": "pending, ready, failed, deleting or deleted"}
    )
    version = fields.String(required=True)
    size_bytes = fields.Integer(allow_none=True)
    last_error = fields.String(allow_none=True)
    created_at = fields.DateTime(required=True)
    ready_at = fields.DateTime(allow_none=True)


class SnapshotListSchema(ma.Schema):
    items = fields.List(fields.Nested(SnapshotSchema), required=True)


class ResetSchema(ma.Schema):
    snapshot = fields.String(
        metadata={"description": "The snapshot to go back to; the default is the one the database was made from"},
        **_SOURCE_ID,
    )


class TemplateCreateSchema(ma.Schema):
    key = fields.String(
        required=True,
        validate=validate.Regexp(r"^[A-Za-z0-9._:-]{1,255}$", error="Must be 1 to 255 of A-Z a-z 0-9 . _ : -"),
        metadata={"description": "A hash of the migrations and fixtures, e.g. sha256:...", "example": "sha256:9f2c"},
    )
    version = fields.String(**_VERSION)


class TemplateFinalizeSchema(ma.Schema):
    pool_size = fields.Integer(
        load_default=0, strict=True, validate=validate.Range(min=0, max=20),
        metadata={"description": "Warm clones kept ready for creates that name this template"},
    )


class TemplateSchema(ma.Schema):
    id = fields.String(required=True)
    key = fields.String(required=True)
    version = fields.String(required=True)
    status = fields.String(
        required=True, metadata={"description": "building, finalizing, ready or failed"}
    )
    pool_size = fields.Integer(required=True)
    snapshot_id = fields.String(allow_none=True)
    created_at = fields.DateTime(required=True)
    ready_at = fields.DateTime(allow_none=True)
    database = fields.Nested(
        DatabaseWithCredentialsSchema,
        allow_none=True,
        metadata={"description": "To the client that builds it: the database to fill, with its credentials"},
    )


class TemplateListSchema(ma.Schema):
    items = fields.List(fields.Nested(TemplateSchema), required=True)


class QuotaSchema(ma.Schema):
    tenant = fields.String(required=True)
    used = fields.Integer(required=True, metadata={"description": "Databases not yet deleted"})
    limit = fields.Integer(required=True)


class StorageSchema(ma.Schema):
    backend = fields.String(
        required=True,
        metadata={
            "description": "btrfs (snapshots of running servers and clones in constant time, "
            "no disk until written) or copy (file by file, the server stopped for a snapshot)",
            "example": "btrfs",
        },
    )
    reason = fields.String(
        metadata={"description": "Why this backend (for an admin)", "example": "the btrfs directory /srv/pool"}
    )
    pool = fields.String(metadata={"description": "The pool's directory (for an admin)"})
    free_bytes = fields.Integer(
        metadata={"description": "Bytes the pool can still take, the disk under it counted (for an admin)"}
    )
    size_bytes = fields.Integer(metadata={"description": "The pool's size (for an admin)"})


class HealthSchema(ma.Schema):
    status = fields.String(
        required=True,
        metadata={"example": "ok", "description": "ok, or degraded when a version's image is missing"},
    )
    checks = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={
            "description": "ok, or why not: the store's or the engine's words for an admin, "
            "unavailable for anyone else",
            "example": {"metadata": "ok", "docker": "ok"},
        },
    )
    images = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={
            "description": "Each version's image: available, pulling, or missing "
            "(an admin sees why: missing: <why>)",
            "example": {"17": "available", "16": "missing: cannot pull postgres:16: ..."},
        },
    )
    storage = fields.Nested(StorageSchema)


class ProblemSchema(ma.Schema):
    """RFC 9457 problem details: every error has this shape."""

    type = fields.String(
        required=True, metadata={"example": "urn:dbprov:problem:validation-error"}
    )
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String()
    database_id = fields.String(metadata={"description": "For provisioning-failed problems"})
    image = fields.String(metadata={"description": "For image-missing problems"})
    template = fields.String(metadata={"description": "For locked problems: the template being built"})
    version = fields.String(metadata={"description": "For image-missing problems"})
    used = fields.Integer(metadata={"description": "For quota-exceeded problems"})
    limit = fields.Integer(metadata={"description": "For quota-exceeded problems"})
    errors = fields.Dict(
        metadata={"description": "Field errors by location and field, for validation problems"}
    )
