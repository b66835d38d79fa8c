"""Re-encrypting stored secrets after a key rotation (``dbprov keys rotate``)."""

from __future__ import annotations

from sqlalchemy import select

from .crypto import Vault
from .models import Database
from .store import Store


def reencrypt_secrets(store: Store, vault: Vault) -> int:
    """Re-encrypt every stored password with the vault's first key; returns how many records."""
    with store.transaction() as session:
        records = list(session.scalars(select(Database)))
        for record in records:
            record.password = vault.rotate(record.password)
            record.admin_password = vault.rotate(record.admin_password)
    return len(records)
