"""Re-encrypting stored secrets after a key rotation (``dbprov keys rotate``)."""

from __future__ import annotations

from sqlalchemy import select

from ..domain.models import CertificateAuthority, Database, Snapshot
from .crypto import Vault
from .engine import Store


def reencrypt_secrets(store: Store, vault: Vault) -> tuple[int, int]:
    """Re-encrypt every stored password with the vault's first key; returns how
    many databases and snapshots (a snapshot keeps its server's superuser,
    which its clones and resets are given)."""
    with store.transaction() as session:
        # Locked, so that a rotation or a reset committed meanwhile is not
        # overwritten with the old value.
        records = list(session.scalars(select(Database).with_for_update()))
        for record in records:
            record.password = vault.rotate(record.password)
            record.admin_password = vault.rotate(record.admin_password)
            if record.pending_password is not None:
                record.pending_password = vault.rotate(record.pending_password)
        snapshots = list(session.scalars(select(Snapshot).with_for_update()))
        for snapshot in snapshots:
            snapshot.admin_password = vault.rotate(snapshot.admin_password)
    return len(records), len(snapshots)


def reencrypt_authority(store: Store, vault: Vault) -> bool:
    """Re-encrypt the private key of the servers' CA with the vault's first
    key; False if no process has made the CA yet."""
    with store.transaction() as session:
        authorities = list(session.scalars(select(CertificateAuthority).with_for_update()))
        for authority in authorities:
            authority.private_key = vault.rotate(authority.private_key)
    return bool(authorities)
