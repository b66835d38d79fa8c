"""An in-memory stand-in for the dbprov API on a loopback port: enough of it
for the client, the command and the pytest plugin, with scripted failures."""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit, urlunsplit

import psycopg
from psycopg import sql


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict | None
    raw: bytes = b""


@dataclass
class Failure:
    method: str
    path: str
    status: int
    body: dict | None
    headers: dict[str, str]
    times: int


@dataclass
class Record:
    id: str
    name: str | None
    version: str
    port: int
    password: str
    ready_at: float
    expires_at: datetime | None = None
    status: str = "pending"
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    #: What a dump streams: the database's "data".
    data: bytes = b""
    source_snapshot_id: str | None = None
    template: str | None = None
    #: Its real database, when the fake has a PostgreSQL server to make them on.
    real_uri: str | None = None

    def settle(self) -> None:
        if self.status == "pending" and time.monotonic() >= self.ready_at:
            self.status = "ready"

    def body(self, credentials: bool = False) -> dict:
        self.settle()
        body = {
            "id": self.id, "tenant": "default", "name": self.name, "status": self.status,
            "version": self.version, "image": f"postgres:{self.version}", "host": "localhost",
            "port": self.port, "database": "app", "username": "app", "superuser": False,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "protected": False, "plan": "default", "parameters": {}, "extensions": [],
            "last_error": None, "phase_timings": {}, "created_at": self.created_at.isoformat(),
            "ready_at": None, "deleted_at": None,
        }
        if credentials:
            body["password"] = self.password
            body["connection_uri"] = self.uri()
        return body

    def uri(self) -> str:
        return self.real_uri or f"postgresql://app:{self.password}@localhost:{self.port}/app"


@dataclass
class FakeSnapshot:
    id: str
    database_id: str
    data: bytes
    status: str = "ready"
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def body(self) -> dict:
        return {"id": self.id, "tenant": "default", "database_id": self.database_id, "status": self.status,
                "version": "17", "size_bytes": len(self.data), "last_error": None,
                "created_at": self.created_at.isoformat(),
                "ready_at": self.created_at.isoformat() if self.status == "ready" else None}


@dataclass
class FakeTemplate:
    id: str
    key: str
    version: str
    database_id: str | None
    status: str = "building"
    pool_size: int = 0
    snapshot_id: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def body(self, database: dict | None = None) -> dict:
        return {"id": self.id, "key": self.key, "version": self.version, "status": self.status,
                "pool_size": self.pool_size, "snapshot_id": self.snapshot_id,
                "created_at": self.created_at.isoformat(), "ready_at": None, "database": database}


# What GET /ca.pem answers: public, like /healthz.
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


def real_name(record: Record) -> str:
    return urlsplit(record.real_uri).path.lstrip("/")


def problem(status: int, title: str, detail: str, slug: str = "error", **extra) -> dict:
    return {"type": f"urn:dbprov:problem:{slug}", "title": title, "status": status, "detail": detail, **extra}


class FakeDbprov:
    def __init__(self) -> None:
        self.databases: dict[str, Record] = {}
        self.seen: list[Seen] = []
        self.failures: list[Failure] = []
        self.keys: dict[str, tuple[str, str]] = {}
        self.snapshots: dict[str, FakeSnapshot] = {}
        self.templates: dict[str, FakeTemplate] = {}
        #: Seconds a database takes to become ready.
        self.provision_seconds = 0.0
        self.token: str | None = None
        #: What /readyz says of the storage.
        self.storage: dict = {"backend": "copy"}
        #: A PostgreSQL server (a superuser's URI) on which each database made
        #: gets a real one, owned by one tenant role with CREATEDB, as dbprov's.
        self.postgres: str | None = None
        self._role: str | None = None
        self._password = ""
        self.lock = threading.RLock()
        self._ports = iter(range(40000, 50000))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                fake.handle(self)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> "FakeDbprov":
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._role is not None:
            with self._admin() as conn:
                owned = conn.execute("SELECT datname FROM pg_database WHERE datdba = %s::regrole",
                                     (self._role,)).fetchall()
                for (name,) in owned:
                    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(self._role)))

    def fail(self, method: str, path: str, status: int, body: dict | None = None,
             headers: dict[str, str] | None = None, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``method path`` (a regex) with ``status``."""
        if body is None:
            body = problem(status, {429: "Too Many Requests", 503: "Service unavailable"}.get(status, "Error"),
                           f"scripted {status}")
        self.failures.append(Failure(method, path, status, body, headers or {}, times))

    def requests_to(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and re.fullmatch(path, s.path)]

    # -- the API -------------------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        binary = handler.headers.get("Content-Type") == "application/octet-stream"
        body = json.loads(raw) if raw and not binary else None
        seen = Seen(handler.command, parts.path, parse_qs(parts.query), dict(handler.headers), body, raw)
        with self.lock:
            self.seen.append(seen)
            scripted = next((f for f in self.failures if f.times > 0 and f.method == seen.method
                             and re.fullmatch(f.path, seen.path)), None)
            if scripted is not None:
                scripted.times -= 1
        if scripted is not None:
            return self._send(handler, scripted.status, scripted.body, scripted.headers)
        if self.token and seen.path not in ("/healthz", "/readyz", "/ca.pem") and \
                seen.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(handler, 401, problem(401, "Unauthorized", "no token, or an unknown one"))
        status, answer, headers = self.route(seen)
        self._send(handler, status, answer, headers)

    def _send(self, handler, status: int, answer, headers: dict[str, str] | None = None) -> None:
        if isinstance(answer, bytes):
            data, kind = answer, "application/octet-stream"
        elif isinstance(answer, str):
            data, kind = answer.encode(), "text/plain"
        else:
            data = json.dumps(answer).encode()
            kind = "application/problem+json" if status >= 400 else "application/json"
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    def route(self, seen: Seen):
        path, method = seen.path, seen.method
        if path == "/healthz":
            return 200, {"status": "ok"}, None
        if path == "/ca.pem":
            return 200, CA_PEM, None
        if path == "/readyz":
            return 200, {"status": "ok", "checks": {"metadata": "ok", "docker": "ok"}, "images": {"17": "available"},
                         "storage": self.storage}, None
        if path == "/quota":
            return 200, {"tenant": "default", "used": self.live(), "limit": 10}, None
        if path == "/plans":
            return 200, {"items": [{"name": "default", "memory": "1g", "cpus": None, "settings": {}}]}, None
        if path == "/databases" and method == "POST":
            return self.create(seen)
        if path == "/databases" and method == "GET":
            items = [r.body() for r in reversed(list(self.databases.values()))]
            if "status" in seen.query:
                items = [i for i in items if i["status"] == seen.query["status"][0]]
            return 200, {"items": items, "page": 1, "page_size": 500, "total": len(items)}, None
        if path.startswith(("/snapshots", "/templates")):
            return self.data_route(seen)
        match = re.fullmatch(r"/databases/([^/]+)(/.*)?", path)
        record = self.databases.get(match[1]) if match else None
        if record is None:
            return 404, problem(404, "Not found", f"no database with id {match[1] if match else path!r}", "not-found"), None
        rest = match[2] or ""
        if rest == "" and method == "GET":
            return 200, record.body(), None
        if rest == "" and method == "PATCH":
            if "ttl" in (seen.body or {}):
                record.expires_at = datetime.now(timezone.utc) + timedelta(seconds=seen.body["ttl"])
            return 200, record.body(), None
        if rest == "" and method == "DELETE":
            record.status = "deleted"
            if record.real_uri and not any(s.database_id == record.id for s in self.snapshots.values()):
                with self._admin() as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(real_name(record))))
            return 202, record.body(), None
        if rest == "/credentials":
            return 200, self.credentials(record), None
        if rest == "/credentials/rotate":
            record.password = secrets.token_hex(8)
            return 200, self.credentials(record), None
        if rest == "/stop":
            record.status = "stopped"
            return 202, record.body(), None
        if rest == "/start":
            record.status = "ready"
            return 200, record.body(), None
        if rest == "/events":
            return 200, {"items": [{"id": 1, "database_id": record.id, "tenant": "default",
                                    "at": record.created_at.isoformat(), "kind": "requested",
                                    "actor": "local", "details": {"version": record.version}}]}, None
        if rest == "/snapshots" and method == "POST":
            snapshot = FakeSnapshot(secrets.token_hex(6), record.id, record.data)
            self.snapshots[snapshot.id] = snapshot
            if "respond-async" in seen.headers.get("Prefer", ""):
                snapshot.status = "pending"
                threading.Timer(0.3, lambda: setattr(snapshot, "status", "ready")).start()
                return 202, snapshot.body(), {"Location": f"/snapshots/{snapshot.id}"}
            return 201, snapshot.body(), {"Location": f"/snapshots/{snapshot.id}"}
        if rest == "/reset" and method == "POST":
            snapshot_id = (seen.body or {}).get("snapshot") or record.source_snapshot_id
            if snapshot_id is None:
                return 409, problem(409, "Conflict", f"database {record.id} has no snapshot to go back to",
                                    "conflict"), None
            record.data = self.snapshots[snapshot_id].data
            return 200, record.body(), None
        if rest == "/dump" and method == "GET":
            return 200, b"PGDMP" + record.data, {"Content-Disposition": f'attachment; filename="{record.id}.dump"'}
        if rest == "/restore" and method == "POST":
            if seen.headers.get("Content-Type") != "application/octet-stream":
                return 415, problem(415, "Unsupported Media Type", "not application/octet-stream"), None
            if not seen.raw.startswith(b"PGDMP"):
                return 422, problem(422, "Unprocessable", "pg_restore: not an archive", "validation-error"), None
            if record.data:
                return 409, problem(409, "Conflict", f"database {record.id} is not empty", "conflict"), None
            record.data = seen.raw[len(b"PGDMP"):]
            return 200, record.body(), None
        if rest == "/logs":
            tail = int(seen.query.get("tail", ["100"])[0])
            return 200, "".join(f"log line {n}\n" for n in range(tail))[-200:], None
        return 404, problem(404, "Not found", "no such route"), None

    def data_route(self, seen: Seen):
        path, method = seen.path, seen.method
        if path == "/snapshots":
            return 200, {"items": [s.body() for s in reversed(list(self.snapshots.values()))]}, None
        match = re.fullmatch(r"/snapshots/([^/]+)", path)
        if match:
            snapshot = self.snapshots.get(match[1])
            if snapshot is None:
                return 404, problem(404, "Not found", f"no snapshot {match[1]!r}", "not-found"), None
            if method == "DELETE":
                snapshot.status = "deleting"
                return 202, snapshot.body(), None
            return 200, snapshot.body(), None
        if path == "/templates" and method == "GET":
            return 200, {"items": [t.body() for t in self.templates.values()]}, None
        if path == "/templates" and method == "POST":
            key = seen.body["key"]
            with self.lock:
                template = self.templates.get(key)
                if template is None:
                    record = Record(secrets.token_hex(6), None, seen.body.get("version", "17"), next(self._ports),
                                    secrets.token_hex(8), time.monotonic(), status="ready")
                    self.materialize(record)
                    self.databases[record.id] = record
                    template = FakeTemplate(secrets.token_hex(6), key, record.version, record.id)
                    self.templates[key] = template
                    return 201, template.body(record.body(credentials=True)), {"Location": f"/templates/{key}"}
            if template.status in ("building", "finalizing"):
                return 423, problem(423, "Being built", f"template {key!r} is being built by another client",
                                    "locked", template=key), {"Retry-After": "1"}
            return 200, template.body(), None
        match = re.fullmatch(r"/templates/([^/]+)(/finalize)?", path)
        template = self.templates.get(match[1]) if match else None
        if template is None:
            return 404, problem(404, "Not found", f"no template {path!r}", "not-found"), None
        if match[2] and method == "POST":
            if template.status != "building":
                return 409, problem(409, "Conflict", f"template is {template.status}", "conflict"), None
            builder = self.databases[template.database_id]
            snapshot = FakeSnapshot(secrets.token_hex(6), builder.id, builder.data)
            self.snapshots[snapshot.id] = snapshot
            builder.status = "deleted"
            template.status, template.snapshot_id = "ready", snapshot.id
            template.pool_size = (seen.body or {}).get("pool_size", 0)
            return 200, template.body(), None
        if method == "DELETE":
            del self.templates[template.key]
            return 202, template.body(), None
        return 200, template.body(), None

    def materialize(self, record: Record, source: FakeSnapshot | None = None) -> None:
        """With ``postgres`` set, a real database for ``record``: a copy of its source's, if it has one."""
        if self.postgres is None:
            return
        with self._admin() as conn:
            if self._role is None:
                self._role, self._password = f"fake_{secrets.token_hex(4)}", secrets.token_hex(8)
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                    sql.Identifier(self._role), sql.Literal(self._password)))
            name = f"fake_{record.id}"
            template = sql.SQL("")
            if source is not None:
                template = sql.SQL(" TEMPLATE {}").format(sql.Identifier(real_name(self.databases[source.database_id])))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}{}").format(
                sql.Identifier(name), sql.Identifier(self._role), template))
        parts = urlsplit(self.postgres)
        record.real_uri = urlunsplit(("postgresql", f"{self._role}:{self._password}@{parts.hostname}:{parts.port}",
                                      f"/{name}", "", ""))

    def _admin(self):
        return psycopg.connect(self.postgres, autocommit=True)

    def live(self) -> int:
        return sum(1 for r in self.databases.values() if r.status != "deleted")

    def credentials(self, record: Record) -> dict:
        return {"username": "app", "password": record.password, "database": "app",
                "host": "localhost", "port": record.port, "connection_uri": record.uri()}

    def create(self, seen: Seen):
        body = seen.body or {}
        key = seen.headers.get("Idempotency-Key")
        canonical = json.dumps(body, sort_keys=True)
        with self.lock:
            if key and key in self.keys:
                known, database_id = self.keys[key]
                if known != canonical:
                    return 422, problem(422, "Request validation failed", "this Idempotency-Key was used "
                                        "with a different request body", "validation-error"), None
                record = self.databases[database_id]
            else:
                name = body.get("name")
                if name and any(r.name == name and r.status != "deleted" for r in self.databases.values()):
                    return 409, problem(409, "Conflict", f"a database named {name!r} already exists", "conflict"), None
                record = Record(
                    secrets.token_hex(6), name, body.get("version", "17"), next(self._ports),
                    secrets.token_hex(8), time.monotonic() + self.provision_seconds,
                    datetime.now(timezone.utc) + timedelta(seconds=body["ttl"]) if "ttl" in body else None,
                )
                source = None
                if body.get("template"):
                    template = self.templates.get(body["template"])
                    if template is None:
                        return 404, problem(404, "Not found", f"no template {body['template']!r}", "not-found"), None
                    if template.status != "ready":
                        return 423, problem(423, "Being built", "being built", "locked"), {"Retry-After": "1"}
                    source = self.snapshots[template.snapshot_id]
                    record.template = template.key
                elif body.get("from_snapshot"):
                    source = self.snapshots.get(body["from_snapshot"])
                    if source is None:
                        return 404, problem(404, "Not found", "no such snapshot", "not-found"), None
                elif body.get("from_database"):
                    database = self.databases[body["from_database"]]
                    source = FakeSnapshot(secrets.token_hex(6), database.id, database.data)
                    self.snapshots[source.id] = source
                if source is not None:
                    record.data, record.source_snapshot_id = source.data, source.id
                self.materialize(record, source)
                self.databases[record.id] = record
                if key:
                    self.keys[key] = (canonical, record.id)
        prefer = seen.headers.get("Prefer", "")
        if "respond-async" not in prefer:
            wait = re.search(r"wait=(\d+)", prefer)
            deadline = time.monotonic() + (int(wait[1]) if wait else 5)
            while record.body()["status"] == "pending" and time.monotonic() < deadline:
                time.sleep(0.02)
        answer = record.body(credentials=True)
        return (202 if answer["status"] == "pending" else 201), answer, {"Location": f"/databases/{record.id}"}
