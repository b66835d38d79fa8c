"""Every error as an RFC 9457 ``application/problem+json`` response."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException

from ..errors import DbprovError

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


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
    return problem_response(
        error.status, error.title, error.detail, slug=error.slug, headers=error.headers(),
        **error.extensions,
    )


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
