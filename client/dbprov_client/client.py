"""The Python client: one method per endpoint of the dbprov API."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import IO, Any

import requests

from . import config
from .create_request import CreateRequest, iso
from .durations import parse_duration
from .errors import Locked, NotFound, ProblemError, Unavailable, WaitTimeout, from_response
from .models import Credentials, Database, DatabasePage, Event, Health, Plan, Quota, Snapshot, Template

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
        request: CreateRequest | None = None,
        *,
        wait: bool = True,
        timeout: float = 600.0,
        idempotency_key: str | None = None,
        on_accepted=None,
        **fields: Any,
    ) -> Database:
        """Create a database; with ``wait`` (the default) return once it accepts
        connections, raising :class:`WaitTimeout` after ``timeout`` seconds.

        What it asks for is a :class:`CreateRequest`, or its fields as
        keywords (``version="17", ttl="10m"``; ``ttl`` may be a duration).
        ``from_snapshot`` (a snapshot id), ``from_database`` (a database id: a
        snapshot of it is taken first) or ``template`` (a ready template's key)
        make it a clone that starts with that data.

        The returned database carries ``password`` and ``connection_uri``. With
        ``on_accepted``, the create is first answered at once and
        ``on_accepted(database)`` called (to show its id) before the wait.
        """
        if request is None:
            if fields.get("ttl") is not None:
                fields["ttl"] = parse_duration(fields["ttl"])
            if fields.get("idle_stop") is not None:
                fields["idle_stop"] = round(parse_duration(fields["idle_stop"]))
            # None asks for the default, but an idle_stop of None is never.
            request = CreateRequest(**{name: value for name, value in fields.items()
                                       if value is not None or name == "idle_stop"})
        elif fields:
            raise TypeError("give a CreateRequest or its fields, not both")
        body = request.body()
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
        idle_stop: Duration | None = _UNSET,
    ) -> Database:
        """Renew the expiry lease (``ttl``), set ``expires_at`` (None: never
        expires), set ``protected``, or ``idle_stop`` (None: never sleeps)."""
        body: dict[str, Any] = {}
        if ttl is not _UNSET:
            body["ttl"] = parse_duration(ttl)
        if expires_at is not _UNSET:
            body["expires_at"] = iso(expires_at) if expires_at is not None else None
        if protected is not _UNSET:
            body["protected"] = protected
        if idle_stop is not _UNSET:
            body["idle_stop"] = None if idle_stop is None else round(parse_duration(idle_stop))
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
            params["since"] = iso(since)
        if until is not None:
            params["until"] = iso(until)
        if limit is not None:
            params["limit"] = limit
        path = f"/databases/{_id(database_id)}/events" if database_id else "/events"
        return [Event.from_dict(item) for item in self._request("GET", path, params=params).json()["items"]]

    def logs(self, database_id: str, tail: int | None = None) -> str:
        """The last lines of the database server's log."""
        params = {"tail": tail} if tail is not None else None
        return self._request("GET", f"/databases/{_id(database_id)}/logs", params=params).text

    # -- data: snapshots, resets, templates, dumps ------------------------------

    def snapshot(self, database_id: str, wait: bool = True, timeout: float = 600.0) -> Snapshot:
        """Take a consistent snapshot of a database (its server stops cleanly for a
        second or two); with ``wait`` (the default), until it is ``ready``."""
        path = f"/databases/{_id(database_id)}/snapshots"
        prefer = f"wait={max(1, int(min(timeout, _WAIT_CHUNK)))}" if wait else "respond-async"
        response = self._request("POST", path, idempotent=False, headers={"Prefer": prefer},
                                 read_timeout=_WAIT_CHUNK + self.timeout)
        snapshot = Snapshot.from_dict(response.json())
        if wait and snapshot.status != "ready":
            snapshot = self.wait_for_snapshot(snapshot.id, timeout)
        return snapshot

    def snapshots(self) -> list[Snapshot]:
        """The tenant's snapshots, newest first."""
        return [Snapshot.from_dict(item) for item in self._request("GET", "/snapshots").json()["items"]]

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        return Snapshot.from_dict(self._request("GET", f"/snapshots/{_id(snapshot_id, 'snapshot')}").json())

    def delete_snapshot(self, snapshot_id: str) -> Snapshot:
        """Delete a snapshot and its data (409 while a template uses it)."""
        path = f"/snapshots/{_id(snapshot_id, 'snapshot')}"
        return Snapshot.from_dict(self._request("DELETE", path).json())

    def wait_for_snapshot(self, snapshot_id: str, timeout: float = 600.0, interval: float = 0.2) -> Snapshot:
        """Poll until the snapshot is ready; a failed one raises :class:`Unavailable`,
        one still pending after ``timeout`` seconds :class:`WaitTimeout`."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.get_snapshot(snapshot_id)
            if snapshot.status == "ready":
                return snapshot
            if snapshot.status != "pending":
                raise Unavailable(
                    502, "Snapshot failed", snapshot.last_error or f"snapshot {snapshot_id} is {snapshot.status}",
                    "urn:dbprov-client:snapshot-failed",
                    {"title": "Snapshot failed", "detail": snapshot.last_error, "snapshot_id": snapshot_id},
                )
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    None, "Timed out", f"snapshot {snapshot_id} is still {snapshot.status} after "
                    f"{timeout:.0f} s", "urn:dbprov-client:wait-timeout",
                    {"title": "Timed out", "snapshot_id": snapshot_id},
                )
            time.sleep(interval)

    def reset(self, database_id: str, snapshot: str | None = None, wait: bool = True,
              timeout: float = 600.0) -> Database:
        """Put a database back to the snapshot it was made from (or ``snapshot``),
        keeping its URI and password; with ``wait`` (the default), until it is ready."""
        prefer = f"wait={max(1, int(min(timeout, _WAIT_CHUNK)))}" if wait else "respond-async"
        response = self._request(
            "POST", f"/databases/{_id(database_id)}/reset", idempotent=False,
            json={"snapshot": _id(snapshot, "snapshot")} if snapshot else None,
            headers={"Prefer": prefer}, read_timeout=_WAIT_CHUNK + self.timeout,
        )
        database = Database.from_dict(response.json())
        if wait and database.status != "ready":
            database = self.wait_for(database.id, {"ready"}, timeout)
        return database

    def begin_template(self, key: str, version: str | None = None, timeout: float = 600.0) -> Template:
        """Ask for the template ``key``: ``status`` ``ready`` when it is (200), or
        ``building`` with ``database`` to fill when this client is the first (201;
        returned once that database accepts connections). Another client building
        it raises :class:`Locked` (423): :meth:`template` waits that out."""
        body = {"key": _key(key), **({"version": version} if version else {})}
        chunk = max(1, int(min(timeout, _WAIT_CHUNK)))
        response = self._request("POST", "/templates", json=body, idempotent=False,
                                 headers={"Prefer": f"wait={chunk}"}, read_timeout=chunk + self.timeout)
        template = Template.from_dict(response.json())
        if response.status_code == 202 and template.database is not None:
            # Its database is still coming up: the template is ours all the same.
            ready = self.wait_for(template.database.id, {"ready"}, timeout)
            credentials = self.credentials(ready.id)
            database = Database.from_dict({**ready.raw, "password": credentials.password,
                                           "connection_uri": credentials.connection_uri})
            template = Template.from_dict({**template.raw, "database": database.raw})
        return template

    def finalize_template(self, key: str, pool_size: int = 0, wait: bool = True,
                          timeout: float = 600.0) -> Template:
        """Finish a template this client filled: a snapshot of its database, from
        which every clone is made, and ``pool_size`` warm clones kept ready.
        With ``wait`` (the default), until it is ``ready``."""
        prefer = f"wait={max(1, int(min(timeout, _WAIT_CHUNK)))}" if wait else "respond-async"
        response = self._request(
            "POST", f"/templates/{_key(key)}/finalize", json={"pool_size": pool_size}, idempotent=False,
            headers={"Prefer": prefer}, read_timeout=_WAIT_CHUNK + self.timeout,
        )
        template = Template.from_dict(response.json())
        if not wait:
            return template
        deadline = time.monotonic() + timeout
        while template.status == "finalizing":
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    None, "Timed out", f"template {key!r} is still finalizing after {timeout:.0f} s",
                    "urn:dbprov-client:wait-timeout", {"title": "Timed out", "template": key},
                )
            time.sleep(0.2)
            template = self.get_template(key)
        return _usable(template)

    def templates(self) -> list[Template]:
        """The tenant's templates."""
        return [Template.from_dict(item) for item in self._request("GET", "/templates").json()["items"]]

    def get_template(self, key: str) -> Template:
        return Template.from_dict(self._request("GET", f"/templates/{_key(key)}").json())

    def delete_template(self, key: str) -> Template:
        """Delete a template: its snapshot, its database and its warm pool go."""
        return Template.from_dict(self._request("DELETE", f"/templates/{_key(key)}").json())

    def template(
        self,
        key: str,
        version: str | None = None,
        *,
        build: Callable[[str], Any],
        pool_size: int = 0,
        timeout: float = 900.0,
    ) -> Template:
        """A ready template for ``key``, built once however many clients ask at once::

            client.template("sha256:...", build=migrate, pool_size=2)

        The first client to ask gets a database to fill: it calls
        ``build(connection_uri)`` and finalizes the template with ``pool_size``
        warm clones. Every other client is answered 423 while that happens, and
        asks again after the server's ``Retry-After`` (at most ``max_retry_wait``
        seconds each time, ``timeout`` seconds in all: then :class:`WaitTimeout`).
        If ``build`` raises, the template is deleted, so that the next client
        builds it afresh, and the exception propagates. A template that failed
        raises :class:`Unavailable`: delete it to build it again.
        """
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            try:
                template = self.begin_template(key, version, timeout=max(1.0, deadline - time.monotonic()))
            except Locked as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(
                        423, "Timed out", f"template {key!r} was still being built by another client "
                        f"after {timeout:.0f} s", "urn:dbprov-client:wait-timeout",
                        {"title": "Timed out", "template": key},
                    ) from None
                delay = retry_after(exc.retry_after)
                if delay is None:
                    delay = random.uniform(0.5, 1.0) * 2 ** min(attempt, 5)
                delay = max(0.1, min(delay, self.max_retry_wait, remaining))
                attempt += 1
                log.debug("template %s is being built by another client; asking again in %.1f s", key, delay)
                self.sleep(delay)
                continue
            if template.database is None:
                return _usable(template)
            log.info("building template %s in database %s", key, template.database.id)
            try:
                build(template.database.connection_uri)
            except BaseException:
                # Free the key: the next client to ask builds it afresh.
                with contextlib.suppress(ProblemError):
                    self.delete_template(key)
                raise
            return self.finalize_template(key, pool_size, timeout=max(1.0, deadline - time.monotonic()))

    def dump(self, database_id: str, to: "str | os.PathLike[str] | IO[bytes]",
             chunk_size: int = 1 << 16) -> int:
        """Stream a pg_dump archive (custom format) of the database into ``to``, a
        binary file object or a path, a chunk at a time; return the bytes written.

        A path is written whole or not at all (through a temporary file beside it).
        """
        response = self._request("GET", f"/databases/{_id(database_id)}/dump", stream=True,
                                 read_timeout=max(self.timeout, 300.0))
        with response:
            if isinstance(to, (str, os.PathLike)):
                folder = os.path.dirname(os.path.abspath(to))
                descriptor, partial = tempfile.mkstemp(prefix=".dbprov-dump-", dir=folder)
                try:
                    with os.fdopen(descriptor, "wb") as file:
                        written = self._copy(response, file, chunk_size)
                    os.replace(partial, to)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(partial)
                    raise
                return written
            return self._copy(response, to, chunk_size)

    def _copy(self, response: requests.Response, file: IO[bytes], chunk_size: int) -> int:
        written = 0
        try:
            for chunk in response.iter_content(chunk_size):
                file.write(chunk)
                written += len(chunk)
        except requests.RequestException as exc:
            raise Unavailable(
                None, "Service unavailable", f"the dump was cut off after {written} bytes: {_reason(exc)}",
                "urn:dbprov-client:unreachable",
            ) from None
        return written

    def restore(self, database_id: str, source: "str | os.PathLike[str] | IO[bytes]",
                timeout: float = 600.0) -> Database:
        """Restore a pg_dump archive (custom format) into an empty database, in one
        transaction. ``source`` is a path or a binary file object, streamed (never
        read whole): a bad archive changes nothing (:class:`Refused`, 422)."""
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as file:
                return self.restore(database_id, file, timeout)
        response = self._request(
            "POST", f"/databases/{_id(database_id)}/restore", data=source, idempotent=False,
            headers={"Content-Type": "application/octet-stream"}, read_timeout=timeout,
        )
        return Database.from_dict(response.json())

    # -- the tenant and the service -------------------------------------------

    def plans(self) -> list[Plan]:
        return [Plan.from_dict(item) for item in self._request("GET", "/plans").json()["items"]]

    def quota(self) -> Quota:
        return Quota.from_dict(self._request("GET", "/quota").json())

    def ca(self) -> str:
        """The certificate (PEM) of the CA that signs every database server's
        certificate: with it as ``sslrootcert``, ``sslmode=verify-full``
        makes sure a connection reaches the server dbprov made."""
        return self._request("GET", "/ca.pem").text

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
        data: IO[bytes] | None = None,
        stream: bool = False,
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
        # A file body is sent again from where it started, or, if it cannot be
        # rewound (a pipe), not sent again at all.
        start = _tell(data) if data is not None else None
        if data is not None and start is None:
            retry = False
        while True:
            if start is not None:
                data.seek(start)
            try:
                response = self._session.request(
                    method, self.url + path, json=json, data=data, params=params, headers=headers,
                    timeout=(min(10.0, self.timeout), read_timeout or self.timeout), stream=stream,
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
                response.close()
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


def _id(database_id: str, kind: str = "database") -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", database_id or ""):
        # Not a path to smuggle: the server would answer 404 anyway.
        raise NotFound(404, "Not Found", f"no {kind} with id {database_id!r}")
    return database_id


def _key(key: str) -> str:
    """A template key as the server takes it (and as a path segment as it is)."""
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,255}", key or "") or key in (".", ".."):
        raise NotFound(404, "Not Found", f"no template {key!r}")
    return key


def _usable(template: Template) -> Template:
    if template.status == "failed":
        raise Unavailable(
            502, "Template failed", f"template {template.key!r} failed; delete it to build it again",
            "urn:dbprov-client:template-failed",
            {"title": "Template failed", "template": template.key},
        )
    return template


def _tell(data: Any) -> int | None:
    try:
        return data.tell() if data.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def _reason(exc: Exception) -> str:
    """The cause of a failed request, without urllib3's wrapping."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    if match:
        return match.group(1).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return str(exc)
