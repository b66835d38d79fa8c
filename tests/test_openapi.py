"""The committed openapi.yaml is exactly what the code generates."""

from __future__ import annotations

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
