"""Authentication, tenants, quotas, rate limits and secrets, on a fake runtime."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import text

from service.app import create_app
from service.domain.models import Database, Snapshot, Token
from service.domain.tenancy import LOCAL_ADMIN, Principal
from service.errors import QuotaExceeded
from service.store.crypto import Vault, generate_key
from service.store.rekey import reencrypt_secrets

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


def test_no_tenant_takes_more_than_its_share_of_the_ports(api, services, token):
    # 10 ports, a limit of 20, and the default DBPROV_TENANT_PORT_SHARE of a half.
    acme, umbrella, ops = token("acme"), token("umbrella"), token("ops", admin=True)
    for _ in range(5):
        assert api.post("/databases", json={}, headers={**acme, **ASYNC}).status_code == 202
    over = assert_problem(api.post("/databases", json={}, headers={**acme, **ASYNC}), 403, "quota-exceeded")
    assert over["used"] == 5 and over["limit"] == 5 and "DBPROV_TENANT_PORT_SHARE" in over["detail"]
    # The others still find ports.
    for _ in range(3):
        assert api.post("/databases", json={}, headers={**umbrella, **ASYNC}).status_code == 202
    # An admin is the operator: past the share, up to the last port.
    for _ in range(2):
        assert api.post("/databases", json={}, headers={**ops, **ASYNC}).status_code == 202
    assert_problem(api.post("/databases", json={}, headers={**ops, **ASYNC}), 503, "port-range-exhausted")


def test_templates_are_limited_per_tenant(api, services, token, settings):
    services.tenants.settings = dataclasses.replace(settings, tenant_templates=2)
    acme, umbrella = token("acme"), token("umbrella")
    for key in ("a", "b"):
        assert api.post("/templates", json={"key": key}, headers={**acme, **ASYNC}).status_code == 202
    refused = api.post("/templates", json={"key": "c"}, headers={**acme, **ASYNC})
    over = assert_problem(refused, 403, "quota-exceeded")
    assert over["used"] == 2 and over["limit"] == 2 and "2 of 2 templates" in over["detail"]
    assert [t["key"] for t in api.get("/templates", headers=acme).get_json()["items"]] == ["a", "b"]
    assert services.tenants.quota("acme")[0] == 2
    # A key it has is no new template.
    assert_problem(api.post("/templates", json={"key": "a"}, headers=acme), 423, "locked")
    assert api.post("/templates", json={"key": "c"}, headers={**umbrella, **ASYNC}).status_code == 202
    assert api.delete("/templates/a", headers=acme).status_code == 202
    assert api.post("/templates", json={"key": "c"}, headers={**acme, **ASYNC}).status_code == 202


def test_a_warm_pool_that_does_not_fit_the_quota_is_refused(api, services, token, reconciler):
    acme = token("acme")
    services.tenants.set_limit("acme", 3)
    api.post("/templates", json={"key": "k"}, headers={**acme, **ASYNC})
    reconciler.run_once(wait=True)
    refused = api.post("/templates/k/finalize", json={"pool_size": 4}, headers={**acme, **ASYNC})
    body = assert_problem(refused, 403, "quota-exceeded")
    assert body["used"] == 1 and body["limit"] == 3 and "at most 3" in body["detail"]
    unchanged = api.get("/templates/k", headers=acme).get_json()
    assert unchanged["status"] == "building" and unchanged["snapshot_id"] is None
    finalized = api.post("/templates/k/finalize", json={"pool_size": 3}, headers={**acme, **ASYNC})
    assert finalized.status_code == 202 and finalized.get_json()["pool_size"] == 3


def test_writes_are_rate_limited_per_token(api, services, token):
    services.tenants.settings = dataclasses.replace(services.settings, rate_limit=3, rate_burst=3)
    acme, other = token("acme"), token("umbrella")
    codes = [api.post("/databases", json={}, headers={**acme, **ASYNC}).status_code for _ in range(4)]
    assert codes == [202, 202, 202, 429]
    limited = api.post("/databases", json={}, headers={**acme, **ASYNC})
    assert_problem(limited, 429, "rate-limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    # Reads are not limited, and neither is another token.
    assert api.get("/databases", headers=acme).status_code == 200
    assert api.post("/databases", json={}, headers={**other, **ASYNC}).status_code == 202


def test_a_burst_then_a_steady_rate_and_deletes_and_renewals_are_free(api, services, token, monkeypatch):
    # Deleting databases hold their ports until reconciled: all ten for acme.
    services.tenants.settings = dataclasses.replace(
        services.settings, rate_limit=60, rate_burst=4, tenant_port_share=1.0
    )
    clock = [1_000_000.0]
    monkeypatch.setattr("service.domain.tenancy.time.time", lambda: clock[0])
    acme = {**token("acme"), **ASYNC}
    made = [api.post("/databases", json={}, headers=acme) for _ in range(4)]
    assert [r.status_code for r in made] == [202] * 4
    limited = api.post("/databases", json={}, headers=acme)
    assert_problem(limited, 429, "rate-limited")
    assert limited.headers["Retry-After"] == "1"
    # A CI job's heartbeat and its teardown never wait for the bucket.
    for response in made:
        database_id = response.get_json()["id"]
        assert api.patch(f"/databases/{database_id}", json={"ttl": 600}, headers=acme).status_code == 200
        assert api.delete(f"/databases/{database_id}", headers=acme).status_code == 202
    # One a second again, and a burst once the bucket has refilled.
    clock[0] += 1.0
    assert api.post("/databases", json={}, headers=acme).status_code == 202
    assert api.post("/databases", json={}, headers=acme).status_code == 429
    clock[0] += 4.0
    assert [api.post("/databases", json={}, headers=acme).status_code for _ in range(5)] == [202] * 4 + [429]


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


@pytest.mark.parametrize("cut_at", ["after the server took it", "before the server took it"])
def test_a_rotation_cut_off_anywhere_leaves_the_store_and_the_server_agreeing(
    client, services, reconciler, monkeypatch, cut_at
):
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    admin = services.server_admin
    set_password = admin.set_password

    def cut_off(*args):
        if cut_at == "after the server took it":
            set_password(*args)
        raise SystemExit("the process ends here")

    monkeypatch.setattr(admin, "set_password", cut_off)
    with pytest.raises(SystemExit):
        services.databases.rotate_password(LOCAL_ADMIN, created["id"])
    monkeypatch.undo()
    # While it may still be under way, a second rotation waits for it.
    assert_problem(client.post(f"/databases/{created['id']}/credentials/rotate"), 409, "conflict")
    # Once older than any rotation takes, the reconciler finishes it.
    with services.store.transaction() as session:
        session.get(Database, created["id"]).pending_since -= timedelta(minutes=5)
    reconciler.run_once(wait=True)
    stored = client.get(f"/databases/{created['id']}/credentials").get_json()["password"]
    assert stored != created["password"]
    assert admin.roles[created["port"]]["app"] == stored
    assert client.post(f"/databases/{created['id']}/credentials/rotate").status_code == 200


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
