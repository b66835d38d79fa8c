"""Authentication, tenants, quotas, rate limits and secrets, on a fake runtime."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from service.app import create_app
from service.crypto import Vault, generate_key
from service.errors import QuotaExceeded
from service.models import Database, Snapshot, Token
from service.rekey import reencrypt_secrets
from service.tenancy import Principal

from .test_api import assert_problem


@pytest.fixture
def api(services):
    """A client of the API as deployed: every call needs a token."""
    return create_app(services).test_client()


@pytest.fixture
def token(services):
    def make(tenant: str, admin: bool = False) -> dict[str, str]:
        _record, plaintext = services.tenants.create_token(tenant, admin)
        return {"Authorization": f"Bearer {plaintext}"}

    return make


ASYNC = {"Prefer": "respond-async"}


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/databases"),
        ("POST", "/databases"),
        ("GET", "/databases/0123456789ab"),
        ("DELETE", "/databases/0123456789ab"),
        ("GET", "/databases/0123456789ab/credentials"),
        ("POST", "/databases/0123456789ab/credentials/rotate"),
        ("GET", "/quota"),
        ("PATCH", "/databases/0123456789ab"),
        ("POST", "/databases/0123456789ab/stop"),
        ("POST", "/databases/0123456789ab/start"),
        ("GET", "/databases/0123456789ab/events"),
        ("GET", "/databases/0123456789ab/logs"),
        ("GET", "/events"),
        ("GET", "/plans"),
    ],
)
def test_every_endpoint_needs_a_token(api, services, method, path):
    response = api.open(path, method=method)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="dbprov"'
    with services.store.transaction() as session:
        assert session.query(Database).count() == 0


@pytest.mark.parametrize(
    "header",
    [
        "Bearer nonsense",
        "Basic dXNlcjpwYXNz",
        "Bearer dbp_0123456789ab.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_bad_tokens_are_401_with_the_error_code(api, header):
    response = api.get("/databases", headers={"Authorization": header})
    assert_problem(response, 401, "unauthorized")
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_health_and_openapi_need_no_token(api):
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200
    assert api.get("/openapi.json").status_code == 200
    assert api.get("/openapi.yaml").status_code == 200


def test_tokens_are_stored_only_as_hashes(services, token):
    headers = token("acme")
    secret = headers["Authorization"].split(".", 1)[1]
    with services.store.transaction() as session:
        stored = session.query(Token).one()
        assert secret not in stored.secret_hash and len(stored.secret_hash) == 64
        dump = " ".join(str(v) for v in session.execute(text("SELECT * FROM tokens")).one())
    assert secret not in dump


def test_revoked_token_stops_working(api, services, token):
    headers = token("acme")
    assert api.get("/databases", headers=headers).status_code == 200
    (record,) = services.tenants.list_tokens()
    services.tenants.revoke_token(record.id)
    assert_problem(api.get("/databases", headers=headers), 401, "unauthorized")


def test_tenants_see_only_their_own_databases(api, running, token):
    acme, umbrella, admin = token("acme"), token("umbrella"), token("ops", admin=True)
    mine = api.post("/databases", json={"name": "shared-name"}, headers=acme).get_json()
    theirs = api.post("/databases", json={"name": "shared-name"}, headers=umbrella).get_json()
    assert mine["tenant"] == "acme" and theirs["tenant"] == "umbrella"

    listing = api.get("/databases", headers=acme).get_json()
    assert [item["id"] for item in listing["items"]] == [mine["id"]]
    # Another tenant's database is exactly as absent as one that never existed.
    for path in (f"/databases/{theirs['id']}", f"/databases/{theirs['id']}/credentials"):
        absent = api.get(path, headers=acme)
        never = api.get(path.replace(theirs["id"], "0123456789ab"), headers=acme)
        assert absent.status_code == never.status_code == 404
        assert absent.get_json()["title"] == never.get_json()["title"]
    assert_problem(api.delete(f"/databases/{theirs['id']}", headers=acme), 404, "not-found")
    assert_problem(
        api.post(f"/databases/{theirs['id']}/credentials/rotate", headers=acme), 404, "not-found"
    )
    assert api.get(f"/databases/{theirs['id']}", headers=umbrella).get_json()["status"] == "ready"

    everything = api.get("/databases", headers=admin).get_json()
    assert {item["id"] for item in everything["items"]} == {mine["id"], theirs["id"]}
    assert api.get(f"/databases/{theirs['id']}/credentials", headers=admin).status_code == 200


def test_quota_is_shown_and_enforced(api, services, token):
    acme = token("acme")
    services.tenants.set_limit("acme", 2)
    assert api.get("/quota", headers=acme).get_json() == {"tenant": "acme", "used": 0, "limit": 2}
    for _ in range(2):
        assert api.post("/databases", json={}, headers={**acme, **ASYNC}).status_code == 202
    over = api.post("/databases", json={}, headers={**acme, **ASYNC})
    body = assert_problem(over, 403, "quota-exceeded")
    assert body["used"] == 2 and body["limit"] == 2
    assert api.get("/quota", headers=acme).get_json()["used"] == 2
    # Other tenants keep the default.
    assert api.get("/quota", headers=token("umbrella")).get_json()["limit"] == 20


def test_parallel_creates_never_exceed_the_quota(services, token):
    token("acme")
    services.tenants.set_limit("acme", 3)
    acme = Principal(tenant="acme")

    def attempt(_):
        try:
            return services.databases.create(acme)
        except QuotaExceeded as exc:
            return exc

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert sum(isinstance(r, Database) for r in results) == 3
    assert sum(isinstance(r, QuotaExceeded) for r in results) == 5
    assert services.tenants.quota("acme") == (3, 3)


def test_writes_are_rate_limited_per_token(api, services, token):
    services.tenants.settings = dataclasses.replace(services.settings, rate_limit=3)
    acme, other = token("acme"), token("umbrella")
    codes = [api.post("/databases", json={}, headers={**acme, **ASYNC}).status_code for _ in range(4)]
    assert codes == [202, 202, 202, 429]
    limited = api.post("/databases", json={}, headers={**acme, **ASYNC})
    assert_problem(limited, 429, "rate-limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    # Reads are not limited, and neither is another token.
    assert api.get("/databases", headers=acme).status_code == 200
    assert api.post("/databases", json={}, headers={**other, **ASYNC}).status_code == 202


def test_superuser_role_only_when_allowed(api, token):
    acme = token("acme")
    refused = api.post("/databases", json={"superuser": True}, headers={**acme, **ASYNC})
    assert_problem(refused, 403, "forbidden")


def test_passwords_are_encrypted_at_rest(client, running, services):
    created = client.post("/databases", json={}).get_json()
    with services.store.transaction() as session:
        row = session.execute(text("SELECT * FROM databases")).one()
    assert created["password"] not in " ".join(str(value) for value in row)
    assert services.vault.decrypt(row.password) == created["password"]


def test_rotation_gives_a_new_password_that_works_and_retires_the_old(client, running, services):
    created = client.post("/databases", json={}).get_json()
    rotated = client.post(f"/databases/{created['id']}/credentials/rotate")
    assert rotated.status_code == 200
    body = rotated.get_json()
    assert body["password"] != created["password"]
    assert body["connection_uri"] == created["connection_uri"].replace(created["password"], body["password"])
    assert services.server_admin.roles[created["port"]]["app"] == body["password"]
    assert client.get(f"/databases/{created['id']}/credentials").get_json()["password"] == body["password"]


def test_rotation_of_a_database_not_ready_is_409(client, services):
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    assert_problem(client.post(f"/databases/{created['id']}/credentials/rotate"), 409, "conflict")


def test_key_rotation_reencrypts_with_the_new_key(client, running, services):
    created = client.post("/databases", json={}).get_json()
    assert client.post(f"/databases/{created['id']}/snapshots").status_code == 201
    old_key = services.settings.secret_keys[0]
    new_key = generate_key()
    services.vault = services.databases.vault = Vault([new_key, old_key])
    assert reencrypt_secrets(services.store, services.vault) == (1, 1)
    only_new = Vault([new_key])
    with services.store.transaction() as session:
        row = session.query(Database).one()
        assert only_new.decrypt(row.password) == created["password"]
        admin = only_new.decrypt(row.admin_password)
        # Clones and resets of the snapshot are given its server's superuser.
        assert only_new.decrypt(session.query(Snapshot).one().admin_password) == admin
