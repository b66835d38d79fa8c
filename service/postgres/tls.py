"""The service's certificate authority, and each database server's certificate.

One CA per installation, kept in the metadata store (``CertificateAuthority``)
so that every API and worker process signs with the same one and
``GET /ca.pem`` answers the same whichever answers: its certificate in clear,
its private key encrypted with the vault like every stored secret
(``dbprov keys rotate`` re-encrypts it). The first process that needs it
makes it; of two that do at once, the one stored first is everyone's.

Every server gets a key of its own each time it is made (``ServerSpec.tls``),
never stored, and a certificate for the names clients reach it by, so that
``sslmode=verify-full`` with the CA works for the host its URI names.
"""

from __future__ import annotations

import ipaddress
import threading
from datetime import timedelta
from typing import NamedTuple, Sequence

import sqlalchemy.exc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..domain.models import CertificateAuthority, utcnow
from ..runtime.protocol import Issuer, ServerCertificate
from ..store.crypto import Vault
from ..store.engine import Store

# The row of the CA that signs the servers' certificates.
_NAME = "servers"
_CA_LIFETIME = timedelta(days=20 * 365)
# Issued when a server is made and never renewed: it lasts as long as the
# server does, within the CA's own lifetime.
_SERVER_LIFETIME = timedelta(days=10 * 365)
# A client whose clock is a little behind still accepts a new certificate.
_BACKDATE = timedelta(hours=1)
# What a client on the machine itself reaches a server by, beside DBPROV_PUBLIC_HOST.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class _Loaded(NamedTuple):
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: str


class Authority:
    """The installation's CA, read (or made) once per process."""

    def __init__(self, store: Store, vault: Vault, public_host: str, instance: str) -> None:
        self.store = store
        self.vault = vault
        self.public_host = public_host
        self.instance = instance
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None

    def certificate_pem(self) -> str:
        """The CA's certificate, PEM: what clients verify servers with."""
        return self._load().pem

    def issuer(self, database_id: str) -> Issuer:
        """Issues certificates for ``database_id``'s server, for DBPROV_PUBLIC_HOST,
        the local names and the hosts the runtime adds. The CA is at hand from
        now on: the runtime's call asks the store nothing."""
        authority = self._load()
        names = (self.public_host, *LOCAL_NAMES)
        return lambda hosts: _issue(authority, f"dbprov-{database_id}", (*names, *hosts))

    def _load(self) -> _Loaded:
        with self._lock:
            while self._loaded is None:
                self._loaded = self._stored() or self._made()
            return self._loaded

    def _stored(self) -> _Loaded | None:
        with self.store.read() as session:
            row = session.get(CertificateAuthority, _NAME)
            if row is None:
                return None
            certificate, encrypted = row.certificate, row.private_key
        key = serialization.load_pem_private_key(self.vault.decrypt(encrypted).encode(), password=None)
        return _Loaded(x509.load_pem_x509_certificate(certificate.encode()), key, certificate)

    def _made(self) -> _Loaded | None:
        """A new CA, stored; None if another process stored one first."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _self_signed(key, f"dbprov CA {self.instance}"[:64])
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        try:
            with self.store.transaction() as session:
                session.add(CertificateAuthority(name=_NAME, certificate=pem, private_key=self.vault.encrypt(key_pem)))
        except sqlalchemy.exc.IntegrityError:
            return None
        return _Loaded(certificate, key, pem)


def _self_signed(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dbprov"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    now = utcnow()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        # It signs servers' certificates, and no other CA's.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _issue(authority: _Loaded, common_name: str, names: Sequence[str]) -> ServerCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    alternatives = list(dict.fromkeys(_general_name(name) for name in names if name))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + _SERVER_LIFETIME, authority.certificate.not_valid_after_utc))
        # libpq checks the host it was given against these alone.
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False
        )
        .sign(authority.key, hashes.SHA256())
    )
    return ServerCertificate(
        certificate=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        key=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    )


def _general_name(host: str) -> x509.GeneralName:
    """An address as an IP entry, which libpq matches a numeric host against; a name as a DNS one."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host.lower())


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    usages = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )
    return x509.KeyUsage(**{**usages, **allowed})
