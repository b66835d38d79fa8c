"""TLS on the real engine: every server's certificate verifies with the CA the
service serves, for the names a client on this machine uses, whichever way the
server was made (a create, a clone, a warm pool's claim, initdb, made anew);
a CA that is not the service's is refused."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.runtime.entry import TLS_DIR

from .conftest import ROOT, ServiceProcess, managed, metric, remove_managed, wait_until

pytestmark = pytest.mark.docker


def create(service, **body) -> dict:
    response = service.request("POST", "/databases", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def verified(created: dict, root: Path, host: str = "localhost") -> psycopg.Connection:
    """A connection that checks the server's certificate against ``root`` and its name against ``host``."""
    return psycopg.connect(
        host=host, port=created["port"], dbname=created["database"], user=created["username"],
        password=created["password"], sslmode="verify-full", sslrootcert=str(root), connect_timeout=5,
    )


def assert_verified(created: dict, root: Path, host: str = "localhost") -> None:
    with verified(created, root, host) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture
def ca(service, tmp_path) -> Path:
    """The service's CA, as `dbprov ca` prints it, in a file."""
    env = {**os.environ, "DBPROV_URL": service.url, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("DBPROV_TOKEN", None)
    printed = subprocess.run(
        [sys.executable, "-m", "dbprov_client", "ca"], env=env, cwd=ROOT, capture_output=True, text=True,
        check=True, timeout=30,
    ).stdout
    assert printed == service.request("GET", "/ca.pem").text
    assert printed.startswith("-----BEGIN CERTIFICATE-----")
    path = tmp_path / "dbprov-ca.pem"
    path.write_text(printed)
    return path


def server_file(docker_client, database_id: str, name: str) -> str:
    result = docker_client.containers.get(f"dbprov-{database_id}").exec_run(["cat", f"{TLS_DIR}/{name}"])
    assert result.exit_code == 0, result.output
    return result.output.decode()


def test_a_database_verifies_by_either_local_name(service, ca, docker_client):
    created = create(service)
    assert "sslmode" not in created["connection_uri"]  # published on loopback: libpq's default
    for host in ("localhost", "127.0.0.1"):
        assert_verified(created, ca, host)
    container = docker_client.containers.get(f"dbprov-{created['id']}")
    owner = container.exec_run(["stat", "-c", "%U %a", f"{TLS_DIR}/server.key"])
    assert owner.output.decode().split() == ["postgres", "600"]
    # Made anew by drift repair, it gets a key of its own.
    before = server_file(docker_client, created["id"], "server.key")
    container.remove(force=True)
    wait_until(lambda: _verifies(created, ca), timeout=30, what="the server made anew to verify")
    assert server_file(docker_client, created["id"], "server.key") != before


def _verifies(created: dict, root: Path) -> bool:
    try:
        assert_verified(created, root)
    except psycopg.OperationalError:
        return False
    return True


def test_a_ca_that_is_not_the_services_is_refused(service, tmp_path):
    created = create(service)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not dbprov")])
    now = datetime.datetime.now(datetime.timezone.utc)
    other = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "other-ca.pem"
    path.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        verified(created, path)


def test_a_clone_verifies_with_a_key_of_its_own(service, ca, docker_client):
    source = create(service)
    clone = create(service, from_database=source["id"])
    assert_verified(clone, ca)
    # The source's server was stopped for the snapshot and started again.
    assert_verified(source, ca)
    assert server_file(docker_client, clone["id"], "server.key") != server_file(docker_client, source["id"], "server.key")


def test_a_server_made_by_initdb_verifies(docker_client, tmp_path):
    # Without golden copies the image's entrypoint starts as root, which hands
    # the key to the server's user.
    service = ServiceProcess(tmp_path, {"DBPROV_GOLDEN_IMAGES": "false"}).start()
    try:
        created = create(service)
        root = tmp_path / "ca.pem"
        root.write_text(service.request("GET", "/ca.pem").text)
        assert_verified(created, root)
        service.delete_all()
    finally:
        service.stop()
    assert managed(docker_client) == []


def test_a_warm_pool_members_claim_verifies(docker_client, tmp_path):
    service = ServiceProcess(tmp_path, {"DBPROV_POOL_SIZE": "17=1"}).start()
    try:
        wait_until(
            lambda: metric(service, "dbprov_pool_servers", status="ready", version="17") == 1,
            timeout=60, what="the pool to be stocked",
        )
        created = create(service)
        assert set(created["phase_timings"]) == {"claim"}, created
        root = tmp_path / "ca.pem"
        root.write_text(service.request("GET", "/ca.pem").text)
        assert_verified(created, root)
        service.delete_all()
    finally:
        service.stop()
    # The pool's own members stay behind by design.
    remove_managed(docker_client)
