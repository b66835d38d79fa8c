"""The web page at /ui, on a fake runtime: signing in, CSRF, headers, tenant
isolation, the admin page and a database's whole life through the forms."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from service.app import create_app
from service.domain.models import Database, Status
from service.ui import security

from .test_api import count_records

UI = Path(__file__).resolve().parents[1] / "service" / "ui"


@pytest.fixture
def page(services):
    """A browser's view of the page as deployed: authentication on."""
    return create_app(services).test_client()


@pytest.fixture
def local_page(services):
    """The page under `dbprov serve --no-auth`."""
    services.auth_required = False
    return create_app(services).test_client()


def csrf_of(response) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', response.get_data(as_text=True))
    assert match, response.get_data(as_text=True)
    return match[1]


def token_for(services, tenant: str, admin: bool = False) -> str:
    return services.tenants.create_token(tenant, admin)[1]


def sign_in(client, token: str) -> str:
    """Sign in through the form; the session's CSRF token afterwards."""
    csrf = csrf_of(client.get("/ui/signin"))
    response = client.post("/ui/signin", data={"token": token, "csrf_token": csrf})
    assert response.status_code == 303, response.get_data(as_text=True)
    assert response.headers["Location"].endswith("/ui/databases")
    return csrf_of(client.get("/ui/databases"))


def create(client, csrf: str, **form) -> str:
    response = client.post("/ui/databases", data={"csrf_token": csrf, **form})
    assert response.status_code == 303, response.get_data(as_text=True)
    match = re.fullmatch(r".*/ui/databases/([0-9a-f]{12})", response.headers["Location"])
    return match[1]


def status(client, database_id: str) -> str:
    response = client.get(f"/ui/databases/{database_id}/status")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["status"]


def wait_for(client, database_id: str, wanted: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (current := status(client, database_id)) != wanted:
        assert time.monotonic() < deadline, f"still {current}, not {wanted}"
        time.sleep(0.05)


def record(services, database_id: str) -> Database:
    with services.store.read() as session:
        return session.get(Database, database_id)


# -- signing in ---------------------------------------------------------------


def test_pages_need_a_signed_in_session(page):
    for path in ("/ui", "/ui/databases", "/ui/admin", "/ui/databases/0123456789ab"):
        response = page.get(path, follow_redirects=True)
        assert response.request.path == "/ui/signin", path
        assert "API token" in response.get_data(as_text=True)
    # What the page's script fetches answers 401, so the script can send the person to sign in.
    assert page.get("/ui/databases/rows").status_code == 401
    assert page.get("/ui/databases/0123456789ab/status").status_code == 401


def test_sign_in_with_a_token_and_out_again(page, services):
    token = token_for(services, "acme")
    csrf = sign_in(page, token)
    listing = page.get("/ui/databases").get_data(as_text=True)
    assert "Tenant <strong>acme</strong>" in listing
    assert "Sign out" in listing and "Admin</a>" not in listing
    response = page.post("/ui/signout", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert page.get("/ui/databases").headers["Location"].endswith("/ui/signin")


def test_a_bad_token_is_refused_and_not_echoed(page, services):
    csrf = csrf_of(page.get("/ui/signin"))
    guess = "dbp_0123456789ab." + "A" * 43
    response = page.post("/ui/signin", data={"token": guess, "csrf_token": csrf})
    assert response.status_code == 401
    body = response.get_data(as_text=True)
    assert "unknown or revoked" in body and guess not in body
    assert page.get("/ui/databases").status_code == 302


def test_the_token_is_sealed_in_the_cookie_and_never_in_a_page(page, services):
    token = token_for(services, "acme")
    csrf = sign_in(page, token)
    database_id = create(page, csrf)
    cookie = page.get_cookie(security.COOKIE_NAME, path="/ui")
    app = create_app(services)
    stored = app.session_interface.get_signing_serializer(app).loads(cookie.value)
    assert token not in cookie.value and token not in str(stored)
    assert services.vault.decrypt(stored["token"]) == token
    secret = token.split(".", 1)[1]
    for path in ("/ui/databases", "/ui/databases/rows", f"/ui/databases/{database_id}", "/ui/signin"):
        assert secret not in page.get(path).get_data(as_text=True), path


def test_a_revoked_token_ends_the_session(page, services):
    token = token_for(services, "acme")
    sign_in(page, token)
    services.tenants.revoke_token(token[4:16])
    response = page.get("/ui/databases", follow_redirects=True)
    assert response.request.path == "/ui/signin"
    assert "revoked" in response.get_data(as_text=True)


def test_without_authentication_there_is_nothing_to_sign_in_to(local_page):
    response = local_page.get("/ui/signin")
    assert response.status_code == 302 and response.headers["Location"].endswith("/ui/databases")
    body = local_page.get("/ui/databases").get_data(as_text=True)
    assert "authentication off" in body and "Sign out" not in body


def test_without_authentication_a_rebinding_page_gets_nothing_of_the_page(local_page, services):
    database_id = create(local_page, csrf_of(local_page.get("/ui/databases")))
    # A page whose own host name was made to resolve to 127.0.0.1.
    rebound = "http://rebound.example:8080"
    for path in ("/ui", "/ui/signin", "/ui/databases", "/ui/databases/rows", f"/ui/databases/{database_id}",
                 f"/ui/databases/{database_id}/uri", f"/ui/databases/{database_id}/delete", "/ui/admin",
                 "/ui/static/ui.js"):
        response = local_page.get(path, base_url=rebound)
        assert response.status_code == 403, path
        assert response.get_json(force=True)["type"] == "urn:dbprov:problem:loopback-only"
    csrf = csrf_of(local_page.get("/ui/databases", base_url="http://127.0.0.1:8080"))
    for action in ("reveal", "delete"):
        response = local_page.post(f"/ui/databases/{database_id}/{action}", data={"csrf_token": csrf},
                                   base_url=rebound)
        assert response.status_code == 403 and "password" not in response.get_data(as_text=True)
    assert record(services, database_id).status != Status.DELETING


# -- CSRF, cookies and headers ----------------------------------------------------


def test_every_form_is_refused_without_the_sessions_csrf_token(page, services):
    token = token_for(services, "acme")
    # Signing in is a form too: a forged sign-in is refused.
    assert page.post("/ui/signin", data={"token": token}).status_code == 400
    csrf = sign_in(page, token)
    database_id = create(page, csrf)
    count = count_records(services)
    attempts = [
        ("/ui/databases", {"version": "17"}),
        (f"/ui/databases/{database_id}/delete", {}),
        (f"/ui/databases/{database_id}/stop", {}),
        (f"/ui/databases/{database_id}/rotate", {}),
        (f"/ui/databases/{database_id}/reveal", {}),
        ("/ui/signout", {}),
    ]
    for path, form in attempts:
        for sent in ({}, {"csrf_token": "forged"}, {"csrf_token": csrf[:-1]}):
            response = page.post(path, data={**form, **sent})
            assert response.status_code == 400, (path, sent)
            assert "Form expired" in response.get_data(as_text=True)
    # The right token, but sent from another site by the browser's account.
    response = page.post("/ui/databases", data={"csrf_token": csrf}, headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 400
    assert count_records(services) == count
    assert record(services, database_id).status not in (Status.DELETING, Status.STOPPING)
    # Still signed in: nothing was done, not even the sign-out.
    assert page.get("/ui/databases").status_code == 200


def test_the_uri_is_only_given_to_the_pages_script(page, services):
    csrf = sign_in(page, token_for(services, "acme"))
    database_id = create(page, csrf)
    assert page.get(f"/ui/databases/{database_id}/uri").status_code == 400
    response = page.get(f"/ui/databases/{database_id}/uri", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200
    assert response.get_json()["connection_uri"].startswith("postgresql://app:")


def test_security_headers_on_every_ui_response(page, services):
    csrf = sign_in(page, token_for(services, "acme"))
    database_id = create(page, csrf)
    for path in ("/ui/signin", "/ui/databases", "/ui/databases/rows", f"/ui/databases/{database_id}",
                 "/ui/static/ui.js", "/ui/static/ui.css", "/ui/no-such-page",
                 "/ui/databases/0123456789ab"):
        with page.get(path) as response:
            headers = response.headers
        policy = headers.get("Content-Security-Policy", "")
        assert "default-src 'self'" in policy, path
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy, path
        assert "frame-ancestors 'none'" in policy, path
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
    assert page.get("/ui/databases").headers["Cache-Control"] == "no-store"
    # The API is not the page's: no page headers, no cookie.
    api = page.get("/healthz")
    assert "Content-Security-Policy" not in api.headers and "Set-Cookie" not in api.headers


def test_the_session_cookie_flags(services):
    client = create_app(services).test_client()
    cookie = client.get("/ui/signin").headers["Set-Cookie"]
    assert cookie.startswith(f"{security.COOKIE_NAME}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie
    over_https = create_app(services).test_client()
    assert "Secure" in over_https.get("/ui/signin", base_url="https://dbprov.example").headers["Set-Cookie"]
    behind_proxy = create_app(services).test_client()
    forwarded = behind_proxy.get("/ui/signin", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in forwarded.headers["Set-Cookie"]


def test_session_keys_are_derived_from_the_secret_keys(settings):
    keys = security.session_keys(settings)
    assert keys == security.session_keys(settings)
    assert len(keys) == len(settings.secret_keys)
    assert all(secret not in keys for secret in settings.secret_keys)


def test_templates_and_script_need_no_inline_code_or_outside_hosts():
    for path in [*UI.glob("templates/ui/*.html"), *UI.glob("static/*")]:
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\ssrc=)", text), path
        assert not re.search(r"\son[a-z]+\s*=", text), path
        assert " style=" not in text and "<style" not in text, path
        assert not re.search(r"https?://", text.replace("http://www.w3.org", "")), path


def test_the_page_is_not_in_the_openapi_document(page):
    spec = page.get("/openapi.json").get_json()
    assert not [path for path in spec["paths"] if path.startswith("/ui")]


# -- tenants and admins -----------------------------------------------------------


def test_another_tenants_database_is_not_found_in_the_page_either(page, services):
    other = create_app(services).test_client()
    theirs = create(other, sign_in(other, token_for(services, "globex")), name="secret-plans")
    csrf = sign_in(page, token_for(services, "acme"))
    assert "secret-plans" not in page.get("/ui/databases").get_data(as_text=True)
    assert theirs not in page.get("/ui/databases/rows").get_data(as_text=True)
    for path in (f"/ui/databases/{theirs}", f"/ui/databases/{theirs}/status",
                 f"/ui/databases/{theirs}/delete"):
        assert page.get(path, headers={"X-CSRF-Token": csrf}).status_code == 404, path
    assert page.get(f"/ui/databases/{theirs}/uri", headers={"X-CSRF-Token": csrf}).status_code == 404
    for action in ("delete", "stop", "rotate", "reveal"):
        response = page.post(f"/ui/databases/{theirs}/{action}", data={"csrf_token": csrf})
        assert response.status_code == 404, action
        assert "secret-plans" not in response.get_data(as_text=True)
    assert record(services, theirs).status == Status.PENDING


def test_the_admin_page_is_for_admins_only(page, services, running):
    sign_in(page, token_for(services, "acme"))
    response = page.get("/ui/admin")
    assert response.status_code == 403
    assert "Admins only" in response.get_data(as_text=True)

    admin = create_app(services).test_client()
    csrf = sign_in(admin, token_for(services, "ops", admin=True))
    database_id = create(admin, csrf, name="audit")
    wait_for(admin, database_id, "ready")
    body = admin.get("/ui/admin").get_data(as_text=True)
    assert "Warm pool" in body and "Ports" in body and "Tenants" in body
    port = record(services, database_id).host_port
    assert f">{port}</th>" in body and "audit" in body
    assert "1 of 10 ports in use (20000–20009)" in body
    assert ">acme</th>" in body and ">ops</th>" in body and "1 (1 admin)" in body
    assert "_pool" not in body
    # An admin lists every tenant's databases, with the tenant.
    rows = admin.get("/ui/databases/rows").get_data(as_text=True)
    assert 'data-field="tenant">ops<' in rows


def test_tenant_summaries_count_live_databases_and_working_tokens(services, local):
    services.tenants.create_token("acme")
    revoked = services.tenants.create_token("acme", admin=True)[0]
    services.tenants.revoke_token(revoked.id)
    services.tenants.set_limit("acme", 3)
    services.databases.create(local)
    summaries = {summary.name: summary for summary in services.tenants.summaries()}
    assert "_pool" not in summaries
    assert (summaries["acme"].live, summaries["acme"].limit, summaries["acme"].tokens) == (0, 3, 1)
    assert summaries["acme"].admin_tokens == 0
    assert summaries["default"].live == 1


# -- a database's life through the page ---------------------------------------------


def test_create_follow_copy_reveal_rotate_stop_start_and_delete(page, services, running, runtime):
    csrf = sign_in(page, token_for(services, "acme"))
    form = page.get("/ui/databases").get_data(as_text=True)
    for label in ("PostgreSQL version", "Name", "Expires after", "Plan"):
        assert f">{label}" in form
    database_id = create(page, csrf, version="15", name="orders", ttl="3600", plan="default")
    detail = page.get(f"/ui/databases/{database_id}").get_data(as_text=True)
    assert "Database orders is being created." in detail and "data-busy" in detail
    assert "Copy URI" in detail
    wait_for(page, database_id, "ready")

    created = record(services, database_id)
    assert (created.version, created.name, created.tenant) == ("15", "orders", "acme")
    rows = page.get("/ui/databases/rows").get_data(as_text=True)
    assert "orders" in rows and "s-ready" in rows and str(created.host_port) in rows
    assert "in 59 min" in rows

    password = services.databases.credentials(created).password
    detail = page.get(f"/ui/databases/{database_id}").get_data(as_text=True)
    assert password not in detail and "Reveal password" in detail
    assert "requested" in detail and "ready" in detail  # events
    uri = page.get(f"/ui/databases/{database_id}/uri", headers={"X-CSRF-Token": csrf}).get_json()
    assert uri["connection_uri"] == f"postgresql://app:{password}@localhost:{created.host_port}/app"
    revealed = page.post(f"/ui/databases/{database_id}/reveal", data={"csrf_token": csrf})
    assert revealed.status_code == 200 and password in revealed.get_data(as_text=True)
    assert revealed.headers["Cache-Control"] == "no-store"

    confirm = page.get(f"/ui/databases/{database_id}/rotate").get_data(as_text=True)
    assert "Rotate the password of orders?" in confirm
    rotated = page.post(f"/ui/databases/{database_id}/rotate", data={"csrf_token": csrf})
    new_password = services.databases.credentials(record(services, database_id)).password
    assert new_password != password and new_password in rotated.get_data(as_text=True)

    assert "Stop orders?" in page.get(f"/ui/databases/{database_id}/stop").get_data(as_text=True)
    response = page.post(f"/ui/databases/{database_id}/stop", data={"csrf_token": csrf})
    assert response.status_code == 303
    wait_for(page, database_id, "stopped")
    detail = page.get(f"/ui/databases/{database_id}").get_data(as_text=True)
    assert f"/ui/databases/{database_id}/start" in detail and f"/{database_id}/stop" not in detail
    page.post(f"/ui/databases/{database_id}/start", data={"csrf_token": csrf})
    wait_for(page, database_id, "ready")

    # A start of a ready database is refused, and said so.
    refused = page.post(f"/ui/databases/{database_id}/start", data={"csrf_token": csrf})
    assert refused.status_code == 409 and "only a stopped database" in refused.get_data(as_text=True)

    assert "cannot be undone" in page.get(f"/ui/databases/{database_id}/delete").get_data(as_text=True)
    response = page.post(f"/ui/databases/{database_id}/delete", data={"csrf_token": csrf}, follow_redirects=True)
    assert "Database orders is being deleted." in response.get_data(as_text=True)
    wait_for(page, database_id, "deleted")
    assert "orders" not in page.get("/ui/databases/rows").get_data(as_text=True)
    assert "orders" in page.get("/ui/databases/rows?deleted=1").get_data(as_text=True)
    events = page.get(f"/ui/databases/{database_id}").get_data(as_text=True)
    for kind in ("credentials-rotated", "stopped", "started", "deleted"):
        assert f">{kind}<" in events


def test_a_refused_create_keeps_the_form_and_says_why(page, services):
    csrf = sign_in(page, token_for(services, "acme"))
    response = page.post("/ui/databases", data={"csrf_token": csrf, "name": "Bad Name", "ttl": "900"})
    assert response.status_code == 422
    body = response.get_data(as_text=True)
    assert "Not created: invalid name" in body and 'value="Bad Name"' in body
    assert 'aria-invalid="true" aria-describedby="name-hint name-error"' in body
    assert '<p id="name-error" class="field-error">Must match' in body
    assert '<option value="900" selected>' in body
    services.tenants.set_limit("acme", 0)
    response = page.post("/ui/databases", data={"csrf_token": csrf})
    assert response.status_code == 403 and "0 of 0 databases" in response.get_data(as_text=True)
    assert count_records(services) == 0


def test_the_log_tail_of_a_database(local_page, services, running, runtime):
    csrf = csrf_of(local_page.get("/ui/databases"))
    database_id = create(local_page, csrf)
    wait_for(local_page, database_id, "ready")
    runtime.servers[database_id].logs = "LOG:  database system is ready to accept connections\n"
    detail = local_page.get(f"/ui/databases/{database_id}").get_data(as_text=True)
    assert "ready to accept connections" in detail


def test_the_page_shows_the_latest_events_and_the_databases_in_the_server(local_page, services, running):
    csrf = csrf_of(local_page.get("/ui/databases"))
    database_id = create(local_page, csrf)
    wait_for(local_page, database_id, "ready")
    # A CI heartbeat: far more renewals than the page shows, the last one newest.
    with services.store.transaction() as session:
        held = session.get(Database, database_id)
        for n in range(1, 1101):
            services.records.event(session, held, "renewed", "local", {"beat": n})
    port = record(services, database_id).host_port
    services.server_admin.made[port] = {"app_reports"}
    detail = local_page.get(f"/ui/databases/{database_id}").get_data(as_text=True)
    assert "<code>beat: 1100</code>" in detail and "<code>beat: 1001</code>" in detail
    assert "<code>beat: 1000</code>" not in detail
    assert "Databases in its server" in detail and "<code>app_reports</code>" in detail
