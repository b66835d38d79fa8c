"""Where the client finds its server and token: arguments, then DBPROV_URL and
DBPROV_TOKEN, then what `dbprov login` stored, then the local default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import platformdirs

DEFAULT_URL = "http://127.0.0.1:8080"


def config_path() -> Path:
    """The login file: ``~/.config/dbprov/client.json`` on Linux."""
    return Path(platformdirs.user_config_dir("dbprov")) / "client.json"


def load() -> dict[str, str]:
    try:
        data = json.loads(config_path().read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def save(url: str, token: str | None) -> Path:
    """Store ``url`` and ``token``, readable by the user alone (mode 0600)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"url": url, **({"token": token} if token else {})}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        # An older file may have been created with a wider mode.
        os.fchmod(file.fileno(), 0o600)
        json.dump(data, file, indent=2)
        file.write("\n")
    return path


def resolve(url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """The server URL and token to use. A stored token is sent only to the URL it
    was stored with, so pointing DBPROV_URL elsewhere never leaks it."""
    stored = load()
    url = (url or os.environ.get("DBPROV_URL") or stored.get("url") or DEFAULT_URL).rstrip("/")
    if token is None:
        token = os.environ.get("DBPROV_TOKEN") or None
    if token is None and stored.get("url", "").rstrip("/") == url:
        token = stored.get("token") or None
    return url, token
