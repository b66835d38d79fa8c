"""The HTTP API on a fake runtime: shapes, statuses, validation and errors."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import event

from service.api import common
from service.api.schemas import DatabaseSchema
from service.app import create_app
from service.domain.models import Database
from service.domain.tenancy import LOCAL_ADMIN

PROBLEM = "application/problem+json"
ASYNC_HEADERS = {"Prefer": "respond-async"}


def count_records(services) -> int:
    with services.store.transaction() as session:
        return session.query(Database).count()


def assert_problem(response, status: int, slug: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = response.get_json(force=True)
    assert body["status"] == status
    assert body["title"]
    assert body["type"] == (f"urn:dbprov:problem:{slug}" if slug else "about:blank")
    return body


def test_create_waits_until_ready_and_returns_credentials(client, running, runtime, services):
    response = client.post("/databases", json={"name": "orders", "version": "15"})
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["status"] == "ready"
    assert body["name"] == "orders"
    assert body["version"] == "15" and body["image"] == "postgres:15"
    assert 20000 <= body["port"] <= 20009
    assert response.headers["Location"] == f"/databases/{body['id']}"
    assert body["connection_uri"] == (
        f"postgresql://app:{body['password']}@localhost:{body['port']}/app"
    )
    assert set(body["phase_timings"]) == {"server", "ready", "setup", "total"}
    spec = runtime.servers[body["id"]].spec
    assert spec.port == body["port"]
    # The server's superuser is the service's own; the tenant got a role with its password.
    assert spec.environment["POSTGRES_USER"] == "dbprov_admin"
    assert spec.environment["POSTGRES_PASSWORD"] != body["password"]
    assert services.server_admin.roles[body["port"]]["app"] == body["password"]
    assert body["superuser"] is False and body["tenant"] == "default"


def test_create_with_empty_body_uses_defaults(client, running):
    response = client.post("/databases")
    assert response.status_code == 201
    assert response.get_json()["version"] == "17"


def test_respond_async_answers_202_with_location(client, services):
    # No reconciler runs: the database stays pending.
    response = client.post("/databases", json={}, headers={"Prefer": "respond-async"})
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "pending"
    assert response.headers["Preference-Applied"] == "respond-async"
    assert client.get(response.headers["Location"]).get_json()["status"] == "pending"


def test_wait_running_out_answers_202(client, services):
    response = client.post("/databases", json={}, headers={"Prefer": "wait=0"})
    assert response.status_code == 202
    assert response.get_json()["status"] == "pending"


def test_failed_provisioning_is_a_502_problem_with_the_log(client, running, runtime, services):
    runtime.crashing_images["postgres:15"] = "FATAL: data directory has wrong ownership"
    response = client.post("/databases", json={"version": "15"})
    body = assert_problem(response, 502, "provisioning-failed")
    assert "wrong ownership" in body["detail"]
    record = client.get(f"/databases/{body['database_id']}").get_json()
    assert record["status"] == "failed" and record["port"] is None
    assert "exited (exit code 1)" in record["last_error"]


def test_get_hides_the_password_and_credentials_show_it(client, running):
    created = client.post("/databases", json={}).get_json()
    shown = client.get(f"/databases/{created['id']}").get_json()
    assert "password" not in shown and "connection_uri" not in shown
    assert created["password"] not in str(shown)
    credentials = client.get(f"/databases/{created['id']}/credentials").get_json()
    assert credentials == {
        "username": "app",
        "password": created["password"],
        "database": "app",
        "host": "localhost",
        "port": created["port"],
        "connection_uri": created["connection_uri"],
    }


def test_list_is_paginated_and_filtered(client, services):
    ids = [
        client.post("/databases", json={}, headers={"Prefer": "respond-async"}).get_json()["id"]
        for _ in range(3)
    ]
    client.delete(f"/databases/{ids[0]}")
    page = client.get("/databases?page_size=2").get_json()
    assert page["total"] == 3 and page["page"] == 1 and len(page["items"]) == 2
    second = client.get("/databases?page_size=2&page=2").get_json()
    assert len(second["items"]) == 1
    assert {i["id"] for i in page["items"] + second["items"]} == set(ids)
    deleting = client.get("/databases?status=deleting").get_json()
    assert [i["id"] for i in deleting["items"]] == [ids[0]]
    assert all("password" not in item for item in page["items"])


def test_a_page_past_the_end_is_empty_and_still_has_the_total(client):
    # The total comes with the page's rows; a page without rows counts on its own.
    for _ in range(3):
        client.post("/databases", json={}, headers=ASYNC_HEADERS)
    page = client.get("/databases?page=3&page_size=2").get_json()
    assert page["items"] == [] and page["total"] == 3 and page["next_cursor"] is None


def test_a_database_reads_as_its_schema_dumps_it_alone_and_listed(client, services, running, runtime):
    # A database and the list are serialised without the schema: each must say
    # what the schema says, times, timings, nulls and all.
    ready = client.post("/databases", json={"name": "kept", "ttl": 3600, "parameters": {"work_mem": "8MB"}})
    runtime.crashing_images["postgres:15"] = "FATAL: data directory has wrong ownership"
    failed = client.post("/databases", json={"version": "15"})
    deleting = client.post("/databases", json={}, headers={"Prefer": "respond-async"}).get_json()
    client.delete(f"/databases/{deleting['id']}")
    # Gone before the list is read: a deletion that finished between the list
    # and the reads below would make them differ. The loop may not have taken
    # the delete up yet, so waiting for the tasks submitted is not enough.
    for _ in range(100):
        if client.get(f"/databases/{deleting['id']}").get_json()["status"] == "deleted":
            break
        running.records.changed.wait(0.1)
    running.wait_idle()
    listed = client.get("/databases").get_json()["items"]
    assert {item["status"] for item in listed} >= {"ready", "failed"}, listed
    assert ready.status_code == 201 and failed.status_code == 502
    for item in listed:
        with client.application.app_context():
            dumped = DatabaseSchema().dump(common.present(services.databases.get(LOCAL_ADMIN, item["id"])))
        # Through JSON, as a client reads it.
        assert item == client.get(f"/databases/{item['id']}").get_json() == json.loads(json.dumps(dumped))


def test_delete_is_accepted_and_repeatable(client, running):
    created = client.post("/databases", json={}).get_json()
    first = client.delete(f"/databases/{created['id']}")
    assert first.status_code == 202
    assert first.get_json()["status"] in ("deleting", "deleted")
    running.wait_idle()
    for _ in range(50):
        if client.get(f"/databases/{created['id']}").get_json()["status"] == "deleted":
            break
        running.records.changed.wait(0.1)
    again = client.delete(f"/databases/{created['id']}")
    assert again.status_code == 202
    assert again.get_json()["status"] == "deleted"
    assert again.get_json()["port"] is None


@pytest.mark.parametrize(
    "body, field",
    [
        ({"bogus": 1}, "bogus"),
        ({"name": "Has Spaces"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"name": "-leading-dash"}, "name"),
        ({"name": "robert'); DROP TABLE databases;--"}, "name"),
        ({"name": "ünïcode"}, "name"),
        ({"name": 5}, "name"),
        ({"version": "9"}, "version"),
        ({"version": 17}, "version"),
        ({"version": "seventeen"}, "version"),
    ],
)
def test_invalid_bodies_are_422_and_record_nothing(client, services, body, field):
    response = client.post("/databases", json=body)
    problem = assert_problem(response, 422, "validation-error")
    assert field in problem["errors"]["json"]
    assert count_records(services) == 0


def test_unsupported_version_lists_the_supported_ones(client, services):
    problem = assert_problem(client.post("/databases", json={"version": "16"}), 422, "validation-error")
    assert "15, 17" in problem["detail"]


@pytest.mark.parametrize("payload", ["[]", '"text"', "null", "42"])
def test_json_that_is_not_an_object_is_422(client, services, payload):
    response = client.post("/databases", data=payload, content_type="application/json")
    assert_problem(response, 422, "validation-error")
    assert count_records(services) == 0


def test_malformed_json_is_400(client, services):
    response = client.post("/databases", data="{bad", content_type="application/json")
    assert_problem(response, 400, "malformed-body")
    assert count_records(services) == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_non_json_body_is_415(client, services, content_type):
    response = client.post("/databases", data='{"name": "x"}', content_type=content_type)
    assert_problem(response, 415)
    assert count_records(services) == 0


def test_oversized_body_is_413(client, services):
    response = client.post(
        "/databases", data='{"name": "' + "a" * 100_000 + '"}', content_type="application/json"
    )
    assert_problem(response, 413)
    assert count_records(services) == 0


def test_duplicate_live_name_is_409(client, services):
    client.post("/databases", json={"name": "shared"}, headers={"Prefer": "respond-async"})
    assert_problem(
        client.post("/databases", json={"name": "shared"}, headers={"Prefer": "respond-async"}),
        409,
        "conflict",
    )
    assert count_records(services) == 1


@pytest.mark.parametrize("path", ["/databases/nope", "/databases/' OR 1=1 --", "/databases/%00"])
def test_unknown_ids_are_404(client, path):
    assert_problem(client.get(path), 404, "not-found")
    assert_problem(client.delete(path), 404, "not-found")


def test_credentials_of_unknown_id_are_404(client):
    assert_problem(client.get("/databases/nope/credentials"), 404, "not-found")


def test_bad_query_is_422(client):
    problem = assert_problem(client.get("/databases?page=0&status=vanished"), 422, "validation-error")
    assert set(problem["errors"]["query"]) == {"page", "status"}


def test_unknown_route_and_method_are_problems(client):
    assert_problem(client.get("/nowhere"), 404)
    response = client.put("/databases")
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]


def test_port_range_exhausted_is_503_with_retry_after(client, services):
    for _ in range(10):
        assert client.post("/databases", json={}, headers={"Prefer": "respond-async"}).status_code == 202
    response = client.post("/databases", json={}, headers={"Prefer": "respond-async"})
    assert_problem(response, 503, "port-range-exhausted")
    assert int(response.headers["Retry-After"]) > 0
    assert count_records(services) == 10


def test_readyz_names_the_unreachable_part(client, runtime):
    assert client.get("/readyz").status_code == 200
    runtime.reachable = False
    response = client.get("/readyz")
    body = assert_problem(response, 503, "not-ready")
    assert body["checks"]["metadata"] == "ok"
    assert "unreachable" in body["checks"]["docker"]
    assert "docker" in body["detail"]
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_lists_each_versions_image(client, runtime):
    assert client.get("/readyz").get_json()["images"] == {"15": "available", "17": "available"}
    runtime.missing_images.add("postgres:15")
    body = client.get("/readyz").get_json()
    assert body["status"] == "degraded"
    # The first look starts a pull, which the fake refuses at once.
    assert body["images"]["15"] in ("pulling", "missing: cannot pull postgres:15: no registry answers")


def test_readyz_tells_why_to_admins_only(services, runtime):
    api = create_app(services).test_client()  # authentication on
    admin = {"Authorization": f"Bearer {services.tenants.create_token('ops', True)[1]}"}
    others = [{}, {"Authorization": f"Bearer {services.tenants.create_token('acme')[1]}"},
              {"Authorization": "Bearer nonsense"}]
    runtime.reachable = False
    for headers in others:
        body = assert_problem(api.get("/readyz", headers=headers), 503, "not-ready")
        assert body["checks"] == {"metadata": "ok", "docker": "unavailable"}
        assert body["detail"] == "unreachable: docker"
    body = assert_problem(api.get("/readyz", headers=admin), 503, "not-ready")
    assert body["checks"]["docker"] == "Docker engine unreachable: fake is down"

    runtime.reachable = True
    runtime.missing_images.add("postgres:15")
    deadline = time.monotonic() + 5
    while services.images.check()["15"] == "pulling" and time.monotonic() < deadline:
        time.sleep(0.01)
    for headers in others:
        body = api.get("/readyz", headers=headers).get_json()
        assert body == {"status": "degraded", "checks": {"metadata": "ok", "docker": "ok"},
                        "images": {"15": "missing", "17": "available"}, "storage": {"backend": "copy"}}
    body = api.get("/readyz", headers=admin).get_json()
    assert body["images"]["15"] == "missing: cannot pull postgres:15: no registry answers"
    # Why this backend names paths of the host: for admins only.
    assert body["storage"] == {"backend": "copy", "reason": "the fake's"}


def test_readyz_without_its_store_tells_no_one_why(services):
    api = create_app(services).test_client()
    admin = {"Authorization": f"Bearer {services.tenants.create_token('ops', True)[1]}"}
    for engine in {services.store.engine, services.store.read_engine, services.store.lookup_engine}:
        engine.dispose()

        @event.listens_for(engine, "do_connect")
        def refuse(*_args, engine=engine, **_kwargs):
            raise engine.dialect.loaded_dbapi.OperationalError("connection refused")

    # Nor an admin: the store that could tell the token is one is what is down.
    body = assert_problem(api.get("/readyz", headers=admin), 503, "not-ready")
    assert body["checks"] == {"metadata": "unavailable", "docker": "ok"}


def test_a_version_whose_image_is_missing_is_refused_at_once(client, services, runtime):
    runtime.missing_images.add("postgres:15")
    deadline = time.monotonic() + 5
    while services.images.check()["15"] == "pulling" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert services.images.check()["15"] == "missing: cannot pull postgres:15: no registry answers"
    response = client.post("/databases", json={"version": "15"})
    body = assert_problem(response, 422, "image-missing")
    assert body["image"] == "postgres:15" and body["version"] == "15"
    assert "postgres:15" in body["detail"] and "dbprov images pull" in body["detail"]
    assert "Available: 17" in body["detail"]
    # No record, no port.
    assert count_records(services) == 0
    assert client.post("/databases", json={"version": "17"}, headers={"Prefer": "respond-async"}).status_code == 202


def test_a_version_being_pulled_answers_503_with_retry_after(client, services, runtime, monkeypatch):
    runtime.missing_images.add("postgres:15")
    release = threading.Event()
    monkeypatch.setattr(runtime, "pull_image", lambda image, progress=None: release.wait(10))
    response = client.post("/databases", json={"version": "15"})
    assert_problem(response, 503, "image-pulling")
    assert int(response.headers["Retry-After"]) > 0
    assert count_records(services) == 0
    release.set()


def test_metadata_outage_is_a_503_problem(client, services):
    for engine in {services.store.engine, services.store.read_engine, services.store.lookup_engine}:
        engine.dispose()

        @event.listens_for(engine, "do_connect")
        def refuse(*_args, engine=engine, **_kwargs):
            raise engine.dialect.loaded_dbapi.OperationalError("connection refused")

    response = client.get("/databases")
    assert_problem(response, 503, "metadata-unavailable")
    assert "Retry-After" in response.headers
    assert client.get("/readyz").get_json()["checks"]["metadata"].startswith("metadata store unavailable")


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://elsewhere.example"}],
)
def test_without_authentication_a_browser_post_from_elsewhere_is_refused(client, services, headers):
    assert_problem(client.post("/databases", json={}, headers=headers), 403, "forbidden")
    assert count_records(services) == 0
    same = client.post("/databases", json={}, headers={"Origin": "http://localhost", **ASYNC_HEADERS})
    assert same.status_code == 202


# What a page's script sends once its own host name resolves to 127.0.0.1 (DNS rebinding).
REBOUND = {"Host": "rebound.example:8080"}


def test_without_authentication_a_rebinding_page_cannot_read_credentials(client, services):
    created = client.post("/databases", json={}, headers=ASYNC_HEADERS).get_json()
    path = f"/databases/{created['id']}/credentials"
    refused = assert_problem(client.get(path, headers=REBOUND), 403, "loopback-only")
    assert "rebound.example:8080" in refused["detail"] and "password" not in refused
    for host in ("127.0.0.1:8080", "localhost", "[::1]:9", "LOCALHOST:8080", "127.0.0.1"):
        answered = client.get(path, headers={"Host": host})
        assert answered.status_code == 200, host
        assert answered.get_json()["password"]


@pytest.mark.parametrize(
    "path",
    ["/databases", "/quota", "/events", "/healthz", "/readyz", "/metrics", "/openapi.json",
     "/openapi.yaml", "/docs", "/docs/static/swagger-ui-bundle.js", "/ui", "/ui/databases",
     "/no-such-path"],
)
def test_without_authentication_nothing_answers_another_host_name(client, path):
    assert_problem(client.get(path, headers=REBOUND), 403, "loopback-only")


@pytest.mark.parametrize(
    "host",
    ["localhost.rebound.example", "127.0.0.1.rebound.example:8080", "rebound.example:8080@localhost",
     "[::1]rebound.example", "127.0.0.2:8080", "[::ffff:127.0.0.1]:8080", ""],
)
def test_without_authentication_only_the_loopback_names_count(client, host):
    assert_problem(client.get("/databases", headers={"Host": host}), 403, "loopback-only")


def test_without_authentication_a_rebinding_page_cannot_write_either(client, services):
    # Its Origin matches its Host: it is the same origin as far as the browser knows.
    headers = {**REBOUND, "Origin": "http://rebound.example:8080", **ASYNC_HEADERS}
    assert_problem(client.post("/databases", json={}, headers=headers), 403, "loopback-only")
    # Nor from another loopback origin, or one that claims a loopback name for another host.
    for origin, host in (("http://localhost:3000", "localhost:8080"), ("http://localhost:8080", "127.0.0.1:8080")):
        response = client.post("/databases", json={}, headers={"Origin": origin, "Host": host, **ASYNC_HEADERS})
        assert_problem(response, 403, "forbidden")
    assert count_records(services) == 0
    same = client.post("/databases", json={}, headers={
        "Origin": "http://127.0.0.1:8080", "Host": "127.0.0.1:8080", **ASYNC_HEADERS})
    assert same.status_code == 202


def test_without_authentication_another_machine_is_refused_whatever_host_it_names(client):
    # Should the process listen on another address than loopback after all
    # (a socket handed over by a service manager): any client can send any Host.
    response = client.get("/databases", environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert "192.0.2.7" in assert_problem(response, 403, "loopback-only")["detail"]
    assert client.get("/databases", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    assert client.get("/databases", environ_base={"REMOTE_ADDR": "::ffff:127.0.0.1"}).status_code == 200


def test_with_authentication_any_host_name_is_answered(services):
    # Tokens are the boundary then, and a deployment has a name of its own.
    api = create_app(services).test_client()
    token = services.tenants.create_token("acme")[1]
    response = api.get("/databases", headers={"Host": "dbprov.example", "Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert api.get("/healthz", headers=REBOUND).status_code == 200


def test_a_cursor_walks_the_list_newest_first_without_gaps(client, services):
    made = [client.post("/databases", json={}, headers=ASYNC_HEADERS).get_json()["id"] for _ in range(7)]
    seen, cursor = [], None
    while True:
        query = {"page_size": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/databases", query_string=query).get_json()
        assert page["total"] == 7
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    # Page numbers give the same order.
    numbered = client.get("/databases", query_string={"page": 2, "page_size": 3}).get_json()
    assert [item["id"] for item in numbered["items"]] == seen[3:6]


def test_a_forged_cursor_is_refused(client):
    problem = assert_problem(client.get("/databases?cursor=bm90LWEtY3Vyc29y"), 422, "validation-error")
    assert "cursor" in problem["errors"]["query"]


def test_what_the_openapi_document_allows_the_api_answers_as_documented(client, services, running):
    created = client.post("/databases", json={}).get_json()
    assert client.delete(f"/databases/{created['id']}").status_code == 202
    for _ in range(100):
        if client.get(f"/databases/{created['id']}").get_json()["status"] == "deleted":
            break
        running.records.changed.wait(0.05)
    # A deleted database's password opens nothing and is no one's business.
    gone = client.get(f"/databases/{created['id']}/credentials")
    assert gone.status_code == 404 and "password" not in gone.get_json()
    client.post("/templates", json={"key": "strict"})
    for pool_size in (2.5e-42, 1.0, "1", True):
        refused = client.post("/templates/strict/finalize", json={"pool_size": pool_size})
        assert refused.status_code == 422, (pool_size, refused.get_json())
    assert client.get("/databases", query_string={"cursor": "not a cursor!"}).status_code == 422
    spec = client.get("/openapi.json").get_json()
    create = spec["paths"]["/databases"]["post"]
    assert "423" in create["responses"]
    create_body = spec["components"]["schemas"]["DatabaseCreate"]
    assert "Not together with expires_at" in create_body["properties"]["ttl"]["description"]
    assert create_body["additionalProperties"] is False
