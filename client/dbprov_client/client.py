"""The Python client: one method per endpoint of the dbprov API."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import requests

from . import config
from .durations import parse_duration
from .errors import NotFound, ProblemError, Unavailable, WaitTimeout, from_response
from .models import Credentials, Database, DatabasePage, Event, Health, Plan, Quota

log = logging.getLogger("dbprov_client")

#: Statuses a database passes through before it is ready (or failed).
SETTLING = frozenset({"pending", "provisioning", "starting"})

# How long one waiting request asks the server to hold it (RFC 7240 Prefer:
# wait=N); a longer wait is several requests, so no proxy times one out.
_WAIT_CHUNK = 60
_UNSET: Any = object()

Duration = int | float | str | timedelta


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dbprov-client")
    except Exception:  # noqa: BLE001 - only for the User-Agent
        return "0"


class Client:
    """A dbprov server at ``url`` (default: DBPROV_URL, then what ``dbprov login``
    stored, then http://127.0.0.1:8080), with ``token`` (default: DBPROV_TOKEN, or
    the stored one). Errors raise :class:`~dbprov_client.ProblemError` subclasses.

    Answers 429 and 503 are retried up to ``retries`` times, after the server's
    ``Retry-After`` (at most ``max_retry_wait`` seconds each); a failed connection
    is retried ``connect_retries`` times for requests that are safe to repeat.
    Every create carries an ``Idempotency-Key``, so its retries never make a
    second database.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        max_retry_wait: float = 30.0,
        connect_retries: int = 2,
    ) -> None:
        self.url, self.token = config.resolve(url, token)
        self.timeout = timeout
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.connect_retries = connect_retries
        #: Called with the seconds to wait before a retry (replaceable in tests).
        self.sleep = time.sleep
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"dbprov-client/{_version()}"

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def copy(self) -> "Client":
        """Another client to the same server, with its own connections (one per thread)."""
        return Client(self.url, self.token, timeout=self.timeout, retries=self.retries,
                      max_retry_wait=self.max_retry_wait, connect_retries=self.connect_retries)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- databases ------------------------------------------------------------

    def create(
        self,
        *,
        version: str | None = None,
        name: str | None = None,
        ttl: Duration | None = None,
        expires_at: datetime | None = None,
        plan: str | None = None,
        protected: bool | None = None,
        superuser: bool | None = None,
        parameters: dict[str, str] | None = None,
        extensions: list[str] | None = None,
        wait: bool = True,
        timeout: float = 600.0,
        idempotency_key: str | None = None,
        on_accepted=None,
    ) -> Database:
        """Create a database; with ``wait`` (the default) return once it accepts
        connections, raising :class:`WaitTimeout` after ``timeout`` seconds.

        The returned database carries ``password`` and ``connection_uri``. With
        ``on_accepted``, the create is first answered at once and
        ``on_accepted(database)`` called (to show its id) before the wait.
        """
        body: dict[str, Any] = {
            "version": version, "name": name, "plan": plan, "protected": protected,
            "superuser": superuser, "parameters": parameters, "extensions": extensions,
            "ttl": parse_duration(ttl) if ttl is not None else None,
            "expires_at": _iso(expires_at) if expires_at is not None else None,
        }
        body = {key: value for key, value in body.items() if value is not None}
        key = idempotency_key or f"dbprov-client-{uuid.uuid4().hex}"
        database: Database | None = None
        if not wait or on_accepted is not None:
            database, _ = self._post_create(body, key, "respond-async", self.timeout)
            if not wait:
                return database
            on_accepted(database)
            if database.status not in SETTLING:
                return database
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and database is not None:
                raise WaitTimeout(
                    None, "Timed out", f"database {database.id} is still {database.status} "
                    f"after {timeout:.0f} s", "urn:dbprov-client:wait-timeout",
                    {"title": "Timed out", "database_id": database.id},
                )
            chunk = max(1, int(min(remaining, _WAIT_CHUNK)))
            # The same key and body again: the server answers with the same
            # database, waiting for it as it did the first time.
            database, status = self._post_create(body, key, f"wait={chunk}", chunk + self.timeout)
            if status != 202:
                return database

    def _post_create(self, body: dict, key: str, prefer: str, read_timeout: float) -> tuple[Database, int]:
        response = self._request(
            "POST", "/databases", json=body, read_timeout=read_timeout, idempotent=True,
            headers={"Idempotency-Key": key, "Prefer": prefer},
        )
        return Database.from_dict(response.json()), response.status_code

    @contextlib.contextmanager
    def database(self, **options: Any) -> Iterator[Database]:
        """A fresh database for the ``with`` block, deleted when it ends::

            with client.database(version="17", ttl=600) as db:
                psycopg.connect(db.connection_uri)

        ``options`` are :meth:`create`'s. Give it a ``ttl``: should this process
        die, the server deletes the database when it expires.
        """
        try:
            database = self.create(**options)
        except ProblemError as exc:
            if exc.database_id:  # it was recorded, but never became ready
                with contextlib.suppress(ProblemError):
                    self._discard(exc.database_id)
            raise
        try:
            yield database
        except BaseException:
            with contextlib.suppress(ProblemError):
                self._discard(database.id)
            raise
        self._discard(database.id)

    def _discard(self, database_id: str) -> None:
        with contextlib.suppress(NotFound):
            self.delete(database_id)

    def list(self, status: str | None = None, page: int = 1, page_size: int = 50) -> DatabasePage:
        """One page of the tenant's databases, newest first."""
        params: dict[str, Any] = {"page": page, "page_size": page_size}
        if status:
            params["status"] = status
        return DatabasePage.from_dict(self._request("GET", "/databases", params=params).json())

    def list_all(self, status: str | None = None) -> Iterator[Database]:
        """Every database, page after page."""
        page = 1
        while True:
            result = self.list(status, page, 500)
            yield from result.items
            if page * result.page_size >= result.total or not result.items:
                return
            page += 1

    def get(self, database_id: str) -> Database:
        """One database, without its password."""
        return Database.from_dict(self._request("GET", f"/databases/{_id(database_id)}").json())

    def credentials(self, database_id: str) -> Credentials:
        """User, password and connection URI."""
        path = f"/databases/{_id(database_id)}/credentials"
        return Credentials.from_dict(self._request("GET", path).json())

    def rotate(self, database_id: str) -> Credentials:
        """A new password, working at once; the old one stops working."""
        path = f"/databases/{_id(database_id)}/credentials/rotate"
        return Credentials.from_dict(self._request("POST", path, idempotent=False).json())

    def delete(self, database_id: str, wait: bool = False, timeout: float = 120.0) -> Database:
        """Delete a database (repeating it is harmless); with ``wait``, until it is ``deleted``."""
        database = Database.from_dict(self._request("DELETE", f"/databases/{_id(database_id)}").json())
        if wait and database.status != "deleted":
            database = self.wait_for(database.id, {"deleted"}, timeout)
        return database

    def update(
        self,
        database_id: str,
        *,
        ttl: Duration = _UNSET,
        expires_at: datetime | None = _UNSET,
        protected: bool = _UNSET,
    ) -> Database:
        """Renew the expiry lease (``ttl``), set ``expires_at`` (None: never
        expires), or set ``protected``."""
        body: dict[str, Any] = {}
        if ttl is not _UNSET:
            body["ttl"] = parse_duration(ttl)
        if expires_at is not _UNSET:
            body["expires_at"] = _iso(expires_at) if expires_at is not None else None
        if protected is not _UNSET:
            body["protected"] = protected
        response = self._request("PATCH", f"/databases/{_id(database_id)}", json=body)
        return Database.from_dict(response.json())

    def renew(self, database_id: str, ttl: Duration) -> Database:
        """Expire ``ttl`` from now: the lease a CI job renews as its heartbeat."""
        return self.update(database_id, ttl=ttl)

    def stop(self, database_id: str, wait: bool = False, timeout: float = 120.0) -> Database:
        """Stop its server (data, port and password stay); with ``wait``, until ``stopped``."""
        path = f"/databases/{_id(database_id)}/stop"
        database = Database.from_dict(self._request("POST", path, idempotent=False).json())
        if wait and database.status != "stopped":
            database = self.wait_for(database.id, {"stopped"}, timeout)
        return database

    def start(self, database_id: str, wait: bool = True, timeout: float = 600.0) -> Database:
        """Start a stopped database; with ``wait`` (the default), until it is ready."""
        prefer = f"wait={max(1, int(min(timeout, _WAIT_CHUNK)))}" if wait else "respond-async"
        response = self._request(
            "POST", f"/databases/{_id(database_id)}/start", idempotent=False,
            headers={"Prefer": prefer}, read_timeout=_WAIT_CHUNK + self.timeout,
        )
        database = Database.from_dict(response.json())
        if wait and database.status != "ready":
            database = self.wait_for(database.id, {"ready"}, timeout)
        return database

    def wait_for(self, database_id: str, statuses: set[str], timeout: float = 120.0,
                 interval: float = 0.2) -> Database:
        """Poll until the database's status is one of ``statuses``; a database that
        fails meanwhile raises :class:`Unavailable`, one still short of it after
        ``timeout`` seconds :class:`WaitTimeout`."""
        deadline = time.monotonic() + timeout
        while True:
            database = self.get(database_id)
            if database.status in statuses:
                return database
            if database.status == "failed":
                raise Unavailable(
                    502, "Database failed", database.last_error, "urn:dbprov-client:database-failed",
                    {"title": "Database failed", "detail": database.last_error, "database_id": database.id},
                )
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    None, "Timed out", f"database {database_id} is still {database.status} after "
                    f"{timeout:.0f} s", "urn:dbprov-client:wait-timeout",
                    {"title": "Timed out", "database_id": database_id},
                )
            time.sleep(interval)

    def events(
        self,
        database_id: str | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """A database's events, oldest first; without an id, every database's (admin tokens)."""
        params: dict[str, Any] = {}
        if since is not None:
            params["since"] = _iso(since)
        if until is not None:
            params["until"] = _iso(until)
        if limit is not None:
            params["limit"] = limit
        path = f"/databases/{_id(database_id)}/events" if database_id else "/events"
        return [Event.from_dict(item) for item in self._request("GET", path, params=params).json()["items"]]

    def logs(self, database_id: str, tail: int | None = None) -> str:
        """The last lines of the database server's log."""
        params = {"tail": tail} if tail is not None else None
        return self._request("GET", f"/databases/{_id(database_id)}/logs", params=params).text

    # -- the tenant and the service -------------------------------------------

    def plans(self) -> list[Plan]:
        return [Plan.from_dict(item) for item in self._request("GET", "/plans").json()["items"]]

    def quota(self) -> Quota:
        return Quota.from_dict(self._request("GET", "/quota").json())

    def healthz(self) -> Health:
        return Health.from_dict(self._request("GET", "/healthz", retry=False).json())

    def readyz(self) -> Health:
        """Whether the store and engine are reachable, and each version's image.
        Not ready raises :class:`Unavailable` at once (no retries)."""
        return Health.from_dict(self._request("GET", "/readyz", retry=False).json())

    # -- the wire ---------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
        idempotent: bool | None = None,
        retry: bool = True,
    ) -> requests.Response:
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "PATCH", "DELETE")
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        answered = unanswered = 0
        while True:
            try:
                response = self._session.request(
                    method, self.url + path, json=json, params=params, headers=headers,
                    timeout=(min(10.0, self.timeout), read_timeout or self.timeout),
                )
            except requests.RequestException as exc:
                if retry and idempotent and unanswered < self.connect_retries:
                    delay = min(self.max_retry_wait, 0.5 * 2**unanswered)
                    unanswered += 1
                    log.debug("%s %s: %s; retrying in %.1f s", method, path, _reason(exc), delay)
                    self.sleep(delay)
                    continue
                raise Unavailable(
                    None, "Service unavailable", f"no answer from {self.url}: {_reason(exc)}",
                    "urn:dbprov-client:unreachable",
                ) from None
            if retry and response.status_code in (429, 503) and answered < self.retries:
                delay = self._retry_delay(response, answered)
                answered += 1
                log.debug("%s %s: %s; retrying in %.1f s", method, path, response.status_code, delay)
                self.sleep(delay)
                continue
            if response.status_code >= 400:
                raise from_response(response)
            return response

    def _retry_delay(self, response: requests.Response, attempt: int) -> float:
        """The server's Retry-After (seconds or an HTTP date), else exponential
        backoff with jitter; never more than ``max_retry_wait``."""
        delay = retry_after(response.headers.get("Retry-After"))
        if delay is None:
            delay = random.uniform(0.5, 1.0) * 2**attempt
        return max(0.0, min(delay, self.max_retry_wait))


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header, or None if there is none (or it is not valid)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("give the time with its offset (an aware datetime)")
    return moment.isoformat()


def _id(database_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", database_id or ""):
        # Not a path to smuggle: the server would answer 404 anyway.
        raise NotFound(404, "Not Found", f"no database with id {database_id!r}")
    return database_id


def _reason(exc: Exception) -> str:
    """The cause of a failed request, without urllib3's wrapping."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    if match:
        return match.group(1).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return str(exc)
