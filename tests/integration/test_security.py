"""Tenants, secrets and containment against the real engine and real servers."""

from __future__ import annotations

import logging
import sys
import time

import psycopg
import pytest

from service.app import create_app
from service.composition import Services
from service.domain.models import Database
from service.settings import Settings

from .conftest import INSTANCE, SECRET_KEY, ServiceProcess

pytestmark = pytest.mark.docker


@pytest.fixture
def secured(docker_client, tmp_path):
    """`dbprov serve` with authentication on, and two tenants' tokens."""
    service = ServiceProcess(tmp_path)
    command = [sys.executable, "-m", "service", "serve", "--port", str(service.port)]
    service.start(command)
    tokens = {name: service.create_token(name) for name in ("acme", "umbrella")}
    service.token = service.create_token("ops", admin=True)
    yield service, tokens
    service.delete_all()
    service.stop()


def test_two_tenants_cannot_see_or_touch_each_other(secured):
    service, tokens = secured
    acme = service.request("POST", "/databases", token=tokens["acme"], json={"name": "app"}).json()
    umbrella = service.request("POST", "/databases", token=tokens["umbrella"], json={"name": "app"}).json()
    assert acme["status"] == umbrella["status"] == "ready"
    for mine, theirs, token in ((acme, umbrella, tokens["acme"]), (umbrella, acme, tokens["umbrella"])):
        listing = service.request("GET", "/databases", token=token).json()
        assert [item["id"] for item in listing["items"]] == [mine["id"]]
        assert service.request("GET", f"/databases/{theirs['id']}", token=token).status_code == 404
        assert service.request("DELETE", f"/databases/{theirs['id']}", token=token).status_code == 404
    assert service.request("GET", "/databases").json()["total"] == 2  # the admin sees both
    assert service.request("GET", "/databases", token="dbp_nope").status_code == 401


def test_tenant_role_owns_its_database_but_is_not_a_superuser(secured):
    service, tokens = secured
    created = service.request("POST", "/databases", token=tokens["acme"], json={}).json()
    with psycopg.connect(created["connection_uri"]) as conn:
        # Databases and (bounded, on 16 and later) roles of its own, as test
        # runners need; never a superuser (tests/integration/test_hostile.py).
        assert conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                            "WHERE rolname = current_user").fetchone() == (False, True, True)
        assert conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                            "WHERE datname = current_database()").fetchone() == ("app",)
        conn.execute("CREATE TABLE mine (id int)")
        conn.execute("CREATE SCHEMA extra")
    server = created["connection_uri"].rsplit("/", 1)[0]
    # template1 is where the service works as superuser: closed to the tenant.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server + "/template1", connect_timeout=5)
    # "postgres" is open, as on any server (test runners connect there), and
    # the tenant makes nothing in it.
    with psycopg.connect(server + "/postgres", connect_timeout=5) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE public.planted (id int)")


def test_rotation_works_at_once_and_retires_the_old_password(secured):
    service, tokens = secured
    created = service.request("POST", "/databases", token=tokens["acme"], json={}).json()
    response = service.request(
        "POST", f"/databases/{created['id']}/credentials/rotate", token=tokens["acme"]
    )
    assert response.status_code == 200, response.text
    rotated = response.json()
    with psycopg.connect(rotated["connection_uri"], connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(created["connection_uri"], connect_timeout=5)
    shown = service.request("GET", f"/databases/{created['id']}/credentials", token=tokens["acme"])
    assert shown.json()["password"] == rotated["password"]


def test_containers_are_contained(secured, docker_client):
    service, tokens = secured
    first = service.request("POST", "/databases", token=tokens["acme"], json={}).json()
    second = service.request("POST", "/databases", token=tokens["umbrella"], json={}).json()
    a = docker_client.containers.get(f"dbprov-{first['id']}")
    b = docker_client.containers.get(f"dbprov-{second['id']}")
    host_config = a.attrs["HostConfig"]
    assert host_config["Memory"] == 1024**3
    assert host_config["PidsLimit"] == 512
    assert "no-new-privileges:true" in host_config["SecurityOpt"]
    assert host_config["PortBindings"]["5432/tcp"][0]["HostIp"] == "127.0.0.1"
    network = docker_client.networks.get(f"dbprov-{INSTANCE}")
    assert network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert list(a.attrs["NetworkSettings"]["Networks"]) == [network.name]

    b_address = b.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
    # pg_isready works inside the container (its own server answers) ...
    assert a.exec_run(["pg_isready", "-h", "127.0.0.1", "-t", "3"]).exit_code == 0
    # ... but the other tenant's server, on the same network, does not.
    reach = a.exec_run(["pg_isready", "-h", b_address, "-p", "5432", "-t", "3"])
    assert reach.exit_code != 0, reach.output


def test_no_secret_reaches_a_log_line_or_an_error(docker_client, tmp_path, caplog):
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'meta.sqlite3'}", data_dir=tmp_path,
        port_range=(25600, 25620), images={"17": "postgres:17"}, default_version="17",
        instance=INSTANCE, secret_keys=(SECRET_KEY,), reconcile_interval=0.5,
    )
    caplog.set_level(logging.DEBUG)
    services = Services.build(settings)
    services.store.upgrade(services.vault)
    reconciler = services.reconciler()
    reconciler.start()
    client = create_app(services).test_client()
    _record, token = services.tenants.create_token("acme")
    auth = {"Authorization": f"Bearer {token}"}
    try:
        created = client.post("/databases", json={}, headers=auth).get_json()
        rotated = client.post(f"/databases/{created['id']}/credentials/rotate", headers=auth).get_json()
        # A bad request and a failed rotation must not echo secrets either.
        client.post("/databases", json={"name": created["password"]}, headers=auth)
        client.get("/databases", headers={"Authorization": token + "x"})
        assert client.delete(f"/databases/{created['id']}", headers=auth).status_code == 202
        deadline = time.monotonic() + 30
        while client.get(f"/databases/{created['id']}", headers=auth).get_json()["status"] != "deleted":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        reconciler.stop()
        services.store.dispose()
    with services.store.transaction() as session:
        admin_password = services.vault.decrypt(session.query(Database).one().admin_password)
    secrets = {
        "password": created["password"], "rotated": rotated["password"],
        "admin password": admin_password, "token": token.split(".", 1)[1], "key": SECRET_KEY,
    }
    logged = "\n".join(
        record.getMessage() + (record.exc_text or "") for record in caplog.records
    ) + caplog.text
    assert len(caplog.records) > 10, "the run should have logged something"
    for what, secret in secrets.items():
        assert secret not in logged, f"the {what} was logged"
