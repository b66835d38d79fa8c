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
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict | None


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
        return f"postgresql://app:{self.password}@localhost:{self.port}/app"


def problem(status: int, title: str, detail: str, slug: str = "error", **extra) -> dict:
    return {"type": f"urn:dbprov:problem:{slug}", "title": title, "status": status, "detail": detail, **extra}


class FakeDbprov:
    def __init__(self) -> None:
        self.databases: dict[str, Record] = {}
        self.seen: list[Seen] = []
        self.failures: list[Failure] = []
        self.keys: dict[str, tuple[str, str]] = {}
        #: Seconds a database takes to become ready.
        self.provision_seconds = 0.0
        self.token: str | None = None
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
        body = json.loads(raw) if raw else None
        seen = Seen(handler.command, parts.path, parse_qs(parts.query), dict(handler.headers), body)
        with self.lock:
            self.seen.append(seen)
            scripted = next((f for f in self.failures if f.times > 0 and f.method == seen.method
                             and re.fullmatch(f.path, seen.path)), None)
            if scripted is not None:
                scripted.times -= 1
        if scripted is not None:
            return self._send(handler, scripted.status, scripted.body, scripted.headers)
        if self.token and seen.path not in ("/healthz", "/readyz") and \
                seen.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(handler, 401, problem(401, "Unauthorized", "no token, or an unknown one"))
        status, answer, headers = self.route(seen)
        self._send(handler, status, answer, headers)

    def _send(self, handler, status: int, answer, headers: dict[str, str] | None = None) -> None:
        if isinstance(answer, str):
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
        if path == "/readyz":
            return 200, {"status": "ok", "checks": {"metadata": "ok", "docker": "ok"}, "images": {"17": "available"}}, None
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
        if rest == "/logs":
            tail = int(seen.query.get("tail", ["100"])[0])
            return 200, "".join(f"log line {n}\n" for n in range(tail))[-200:], None
        return 404, problem(404, "Not found", "no such route"), None

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
