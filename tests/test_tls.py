"""The servers' certificate authority: kept in the metadata store, the same for
every process, re-encrypted by a key rotation, served at /ca.pem; each server's
certificate; and when a connection URI asks for TLS. On a fake runtime."""

from __future__ import annotations

import dataclasses
import ipaddress
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select

from service.app import create_app
from service.composition import Services
from service.domain.models import CertificateAuthority, Database
from service.domain.tenancy import Principal
from service.errors import DbprovError
from service.postgres.tls import Authority
from service.store.crypto import Vault, generate_key
from service.store.engine import Store
from service.store.rekey import reencrypt_authority

from .fakes import FakePostgres

TENANT = Principal(tenant="default")


def another_process(services: Services, vault: Vault | None = None) -> Authority:
    """The CA as another API or worker process of the installation finds it."""
    return Authority(services.store, vault or services.vault, services.settings.public_host, "test")


def names_of(pem: str) -> set[str]:
    certificate = x509.load_pem_x509_certificate(pem.encode())
    alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in alternatives}


def test_every_process_of_an_installation_signs_with_the_same_ca(services):
    first = services.authority.certificate_pem()
    assert another_process(services).certificate_pem() == first
    with services.store.read() as session:
        row = session.scalars(select(CertificateAuthority)).one()
    # Its key is stored as every secret is: encrypted.
    assert "PRIVATE KEY" not in row.private_key
    key = serialization.load_pem_private_key(services.vault.decrypt(row.private_key).encode(), password=None)
    ca = x509.load_pem_x509_certificate(first.encode())
    assert ca.public_key() == key.public_key()
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_processes_making_the_ca_at_once_all_keep_the_one_stored_first(services):
    processes = [another_process(services) for _ in range(6)]
    with ThreadPoolExecutor(len(processes)) as pool:
        pems = list(pool.map(lambda authority: authority.certificate_pem(), processes))
    assert len(set(pems)) == 1
    # One whose read came before another stored its CA makes its own, and keeps the other's.
    late = another_process(services)
    stored = late._stored

    def read_too_early():
        late._stored = stored
        return None

    late._stored = read_too_early
    assert late.certificate_pem() == pems[0]
    with services.store.read() as session:
        assert session.scalar(select(func.count()).select_from(CertificateAuthority)) == 1


def test_each_server_gets_its_own_key_and_a_certificate_for_the_names_clients_use(services, reconciler, runtime):
    database = services.databases.create(TENANT)
    reconciler.run_once(wait=True)
    spec = runtime.servers[database.id].spec
    ca = x509.load_pem_x509_certificate(services.authority.certificate_pem().encode())
    # The Swarm runtime adds the node's host.
    issued = spec.tls(("node-1.example.com", "10.0.0.7"))
    certificate = x509.load_pem_x509_certificate(issued.certificate.encode())
    certificate.verify_directly_issued_by(ca)
    assert names_of(issued.certificate) == {"localhost", "127.0.0.1", "::1", "node-1.example.com", "10.0.0.7"}
    alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("::1") in alternatives.get_values_for_type(x509.IPAddress)
    key = serialization.load_pem_private_key(issued.key.encode(), password=None)
    assert certificate.public_key() == key.public_key()
    assert spec.tls(()).key != issued.key
    assert issued.key not in repr(issued)
    with services.store.read() as session:
        assert session.get(Database, database.id).tls


def test_a_key_rotation_reencrypts_the_ca_key(services):
    pem = services.authority.certificate_pem()
    old_key = services.settings.secret_keys[0]
    new_key = generate_key()
    assert reencrypt_authority(services.store, Vault([new_key, old_key]))
    assert another_process(services, Vault([new_key])).certificate_pem() == pem
    with pytest.raises(DbprovError, match="cannot be decrypted"):
        another_process(services, Vault([old_key])).certificate_pem()


def test_a_rotation_before_any_ca_has_nothing_to_reencrypt(services):
    assert not reencrypt_authority(services.store, services.vault)


def test_the_ca_is_served_to_anyone(services):
    api = create_app(services).test_client()
    answer = api.get("/ca.pem")
    assert answer.status_code == 200
    assert answer.mimetype == "application/x-pem-file"
    assert answer.get_data(as_text=True) == services.authority.certificate_pem()
    # Without a token, which every call about databases needs.
    assert api.get("/databases").status_code == 401


@pytest.fixture
def published(settings, runtime):
    """The service with DBPROV_PUBLIC_HOST a name other machines use."""
    def build(**changes) -> Services:
        made = Services(
            dataclasses.replace(settings, **{"public_host": "db.example.com", **changes}), Store(settings.database_url),
            runtime, Vault(settings.secret_keys), server_admin=FakePostgres(runtime),
        )
        made.store.upgrade(made.vault)
        built.append(made)
        return made

    built: list[Services] = []
    yield build
    for made in built:
        made.store.dispose()


def ready(services: Services):
    database = services.databases.create(TENANT)
    reconciler = services.reconciler()
    try:
        reconciler.run_once(wait=True)
    finally:
        reconciler.stop()
    with services.store.read() as session:
        return session.get(Database, database.id)


def test_on_loopback_the_uri_is_as_it_was(services):
    for host in ("localhost", "127.0.0.1", "::1", "[::1]"):
        services.databases.settings = dataclasses.replace(services.settings, public_host=host)
        assert "sslmode" not in services.databases.credentials(ready(services)).connection_uri


def test_published_beyond_loopback_the_uri_asks_for_tls(published, runtime):
    services = published()
    record = ready(services)
    uri = services.databases.credentials(record).connection_uri
    assert uri.startswith("postgresql://app:") and uri.endswith(f"@db.example.com:{record.host_port}/app?sslmode=require")
    assert "db.example.com" in names_of(runtime.servers[record.id].spec.tls(()).certificate)


def test_on_swarm_the_uri_asks_for_tls(published):
    services = published(public_host="localhost", runtime="swarm")
    assert services.databases.credentials(ready(services)).connection_uri.endswith("?sslmode=require")


def test_a_server_made_before_it_had_a_certificate_is_not_asked_for_tls(published):
    services = published()
    record = ready(services)
    services.records.transition(record.id, {record.status}, tls=False)
    with services.store.read() as session:
        record = session.get(Database, record.id)
    assert "sslmode" not in services.databases.credentials(record).connection_uri
