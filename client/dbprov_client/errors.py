"""Errors: every refusal of the server is an RFC 9457 problem document, kept whole."""

from __future__ import annotations

from typing import Any

import requests


class ProblemError(Exception):
    """The server answered with a problem, or could not be reached.

    ``status`` is the HTTP status (None when no answer came at all), ``type``,
    ``title`` and ``detail`` are the problem document's members, ``body`` the
    whole document (with extras such as ``database_id``, ``used``, ``limit``
    or ``errors``) and ``headers`` the response's headers.
    """

    def __init__(
        self,
        status: int | None,
        title: str,
        detail: str | None = None,
        type: str = "about:blank",  # noqa: A002 - the problem member's name
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.body: dict[str, Any] = body if body is not None else {
            "type": type, "title": title, "status": status, "detail": detail,
        }
        self.headers: dict[str, str] = headers or {}
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """Title and detail on one line, as the `dbprov` command prints them."""
        text = self.title if not self.detail else f"{self.title}: {self.detail}"
        return " | ".join(line.strip() for line in text.splitlines() if line.strip())

    @property
    def database_id(self) -> str | None:
        """The database the problem is about, where the server names one."""
        return self.body.get("database_id")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, title={self.title!r}, detail={self.detail!r})"


class NotFound(ProblemError):
    """404: no such database (or one of another tenant)."""


class Refused(ProblemError):
    """Any other 4xx: the request was refused (bad input, quota, conflict, auth, rate)."""


class Locked(Refused):
    """423: another client is building the template right now; ask again after
    ``retry_after`` seconds (:meth:`Client.template` does)."""

    @property
    def retry_after(self) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == "retry-after"), None)


class Unavailable(ProblemError):
    """5xx, no answer at all, or a wait that ran out: the service could not do it now."""


class WaitTimeout(Unavailable):
    """A database did not reach the wanted status in time; ``database_id`` names it."""


def from_response(response: requests.Response) -> ProblemError:
    """The exception for an error response: a problem document, or whatever came instead."""
    status = response.status_code
    headers = dict(response.headers)
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "title" in body:
        title = str(body.get("title"))
        detail = body.get("detail")
        kind = str(body.get("type", "about:blank"))
    else:
        # Not a problem document: a proxy's page, or gunicorn's own 414.
        title = response.reason or f"HTTP {status}"
        text = response.text.strip()
        detail = text[:500] if text else None
        kind = "about:blank"
        body = {"type": kind, "title": title, "status": status, "detail": detail}
    cls = NotFound if status == 404 else Locked if status == 423 else Unavailable if status >= 500 else Refused
    return cls(status, title, detail, kind, body, headers)
