"""Secrets at rest: database passwords encrypted with Fernet (AES-128-CBC + HMAC-SHA256).

Several keys may be configured: the first encrypts, all of them decrypt, so a
key is rotated by putting a new one first, running ``dbprov keys rotate``, and
then dropping the old one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..errors import DbprovError, SettingsError

if TYPE_CHECKING:
    # One way only: settings checks its keys without this module.
    from ..settings import Settings


class Vault:
    def __init__(self, keys: list[str] | tuple[str, ...]) -> None:
        if not keys:
            raise ValueError("at least one key")
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise DbprovError(
                "a stored secret cannot be decrypted with any configured key "
                "(is a key missing from DBPROV_SECRET_KEY?)"
            ) from None

    def rotate(self, token: str) -> str:
        """The same secret, encrypted with the first key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise DbprovError("a stored secret cannot be decrypted with any configured key") from None


def generate_key() -> str:
    return Fernet.generate_key().decode()


def load_vault(settings: "Settings") -> Vault:
    """The configured keys; on the embedded default, a key file made on first use."""
    if settings.secret_keys:
        return Vault(settings.secret_keys)
    if not settings.embedded:
        raise SettingsError(
            "DBPROV_SECRET_KEY",
            "required unless the metadata store is the embedded SQLite; "
            "make one with `dbprov keys generate`",
        )
    path = settings.data_dir / "secret.key"
    try:
        # O_EXCL: two processes starting together cannot both write a key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(generate_key())
    try:
        return Vault([path.read_text().strip()])
    except ValueError:
        raise SettingsError(
            "DBPROV_SECRET_KEY", f"the key file {path} does not hold a Fernet key"
        ) from None

