"""The committed openapi.yaml is exactly what the code generates."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import yaml

from service.app import create_app, openapi_document

COMMITTED = Path(__file__).parent.parent / "openapi.yaml"


def test_committed_document_matches_the_code(services):
    generated = openapi_document(create_app(services))
    assert COMMITTED.read_text() == generated, (
        "openapi.yaml is stale: regenerate it with `dbprov openapi > openapi.yaml`"
    )


def test_served_documents_are_the_same(client):
    served_json = client.get("/openapi.json").get_json()
    served_yaml = yaml.safe_load(client.get("/openapi.yaml").get_data(as_text=True))
    assert served_json == served_yaml == yaml.safe_load(COMMITTED.read_text())
    assert client.get("/docs").status_code == 200


def test_errors_are_documented_as_problems(client):
    spec = client.get("/openapi.json").get_json()
    problem = spec["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status"}
    not_found = spec["components"]["responses"]["NOT_FOUND"]
    assert list(not_found["content"]) == ["application/problem+json"]
    post = spec["paths"]["/databases"]["post"]["responses"]
    assert {"201", "202", "409", "415", "422", "502", "503"} <= set(post)


def test_the_docs_page_loads_nothing_from_another_host(client):
    page = client.get("/docs")
    html = page.get_data(as_text=True)
    loaded = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]*)"', html)
    assert sorted(loaded) == [
        "/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui-standalone-preset.js",
        "/docs/static/swagger-ui.css",
    ]
    for path in loaded:
        with client.get(path) as served:
            assert served.status_code == 200 and len(served.data) > 10_000, path
    assert "://" not in html
    # Swagger UI's default validator is a badge from swagger.io, told where the document is.
    assert '"validatorUrl": null' in html
    # The browser holds the page to it: this origin, and the one inline script by its hash.
    policy = dict(part.strip().split(" ", 1) for part in page.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    (inline,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert policy["script-src"] == f"'self' 'sha256-{digest}'"


def test_only_the_files_the_docs_page_loads_are_served(client):
    # The bundle's own example page loads a document from another host.
    for name in ("index.html", "swagger-initializer.js", "swagger-ui-bundle.js.map", "..%2F__init__.py"):
        assert client.get(f"/docs/static/{name}").status_code == 404
