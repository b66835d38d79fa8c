"""Every error as an RFC 9457 ``application/problem+json`` response."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException

from .. import errors
from ..errors import DbprovError

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"

# Every domain error as HTTP: status, the problem type's slug, and its title.
# An error class not listed takes its nearest listed base class's row.
PROBLEMS: dict[type[DbprovError], tuple[int, str, str]] = {
    DbprovError: (500, "internal-error", "Internal error"),
    errors.SettingsError: (500, "invalid-settings", "Invalid settings"),
    errors.ValidationError: (422, "validation-error", "Request validation failed"),
    errors.Unauthorized: (401, "unauthorized", "Authentication required"),
    errors.Forbidden: (403, "forbidden", "Forbidden"),
    errors.QuotaExceeded: (403, "quota-exceeded", "Database quota exceeded"),
    errors.NotLocal: (403, "loopback-only", "Only for this machine"),
    errors.RateLimited: (429, "rate-limited", "Too many requests"),
    errors.NotFound: (404, "not-found", "Not found"),
    errors.Conflict: (409, "conflict", "Conflict"),
    errors.ImageMissing: (422, "image-missing", "Image missing"),
    errors.TransientError: (503, "unavailable", "Temporarily unavailable"),
    errors.RuntimeUnavailable: (503, "docker-unavailable", "Docker engine unavailable"),
    # A dump or restore of a database whose node went down before the reconciler saw it.
    errors.NodeUnavailable: (503, "node-unavailable", "Database node unavailable"),
    errors.MetadataUnavailable: (503, "metadata-unavailable", "Metadata store unavailable"),
    errors.PortRangeExhausted: (503, "port-range-exhausted", "No free host port"),
    errors.PortInUse: (503, "port-in-use", "Host port in use"),
    errors.EngineError: (503, "docker-error", "Docker engine error"),
    errors.ImagePulling: (503, "image-pulling", "Image being pulled"),
    errors.InsufficientStorage: (507, "insufficient-storage", "Insufficient storage"),
    errors.Locked: (423, "locked", "Being built"),
    errors.PermanentError: (502, "runtime-refused", "Runtime refused"),
    errors.EngineRefused: (502, "docker-refused", "Docker engine refused"),
    errors.ServerFailed: (502, "server-failed", "Database server failed"),
    errors.JobTimedOut: (504, "job-timed-out", "Timed out"),
    errors.DataLost: (410, "data-lost", "Data lost"),
    errors.NotSupported: (501, "not-supported", "Not supported by this runtime"),
    errors.ProvisioningFailed: (502, "provisioning-failed", "Provisioning failed"),
    errors.DatabaseServerError: (502, "database-server-error", "Database server error"),
}


def _row(error: DbprovError) -> tuple[int, str, str]:
    for cls in type(error).__mro__:
        if cls in PROBLEMS:
            return PROBLEMS[cls]
    raise AssertionError("DbprovError is in the table")


def problem_type(slug: str) -> str:
    return f"urn:dbprov:problem:{slug}"


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    slug: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": problem_type(slug) if slug else "about:blank",
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update(extensions)
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_CONTENT_TYPE)
    response.headers.update(headers or {})
    return response


def from_dbprov_error(error: DbprovError) -> Response:
    status, slug, title = _row(error)
    headers = {}
    if error.retry_after:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, errors.Unauthorized):
        # RFC 6750: no error code when the request carried no token at all.
        challenge = 'Bearer realm="dbprov"'
        if error.error:
            challenge += f', error="{error.error}"'
        headers["WWW-Authenticate"] = challenge
    return problem_response(status, title, error.detail, slug=slug, headers=headers, **error.extensions)


def from_http_exception(error: HTTPException) -> Response:
    data = getattr(error, "data", None) or {}
    headers = dict(data.get("headers") or {})
    if error.code == 405 and hasattr(error, "valid_methods") and error.valid_methods:
        headers["Allow"] = ", ".join(error.valid_methods)
    # webargs puts field errors under "messages": {location: {field: [...]}}.
    field_errors = data.get("errors") or data.get("messages")
    if field_errors and error.code == 422:
        return problem_response(
            422,
            "Request validation failed",
            _summarize(field_errors),
            slug="validation-error",
            headers=headers,
            errors=field_errors,
        )
    if field_errors and error.code == 400:
        # webargs's only 400: the body says it is JSON but does not parse.
        return problem_response(
            400, "Malformed request", "the body is not valid JSON", slug="malformed-body",
            headers=headers,
        )
    return problem_response(
        error.code or 500, error.name, data.get("message") or error.description, headers=headers
    )


def from_unexpected(error: Exception) -> Response:
    # The text of an unexpected exception may carry anything, secrets included:
    # it goes to the log, never to the client.
    log.error("unhandled error", exc_info=error)
    return problem_response(500, "Internal Server Error", "the service hit an unexpected error")


def _summarize(field_errors: dict) -> str:
    parts = []
    for location, fields in field_errors.items():
        if isinstance(fields, dict):
            for field, messages in fields.items():
                text = " ".join(messages) if isinstance(messages, list) else str(messages)
                parts.append(f"{field}: {text}" if field != "_schema" else text)
        else:
            parts.append(f"{location}: {fields}")
    return "; ".join(parts) or "invalid request"


def init_app(app: Flask) -> None:
    app.register_error_handler(DbprovError, from_dbprov_error)
    app.register_error_handler(HTTPException, from_http_exception)
    app.register_error_handler(Exception, from_unexpected)
