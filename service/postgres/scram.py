"""PostgreSQL's SCRAM-SHA-256 verifiers, and the SQL text that sets a role's password with one.

For SQL sent as text, where no driver quotes it: the statement a server's
first start runs in single-user mode.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier for ``password``.

    Sending the verifier instead of the password (as psql's \\password does)
    keeps the cleartext out of the server's statement log, which dbprov copies
    into error messages when a container misbehaves.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def identifier(name: str) -> str:
    """``name`` as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """``text`` as an SQL string literal (standard_conforming_strings, the default)."""
    return "'" + text.replace("'", "''") + "'"


def alter_role_password(role: str, password: str) -> str:
    """The statement that gives ``role`` ``password``, as a verifier: an error
    would print the statement, never the password."""
    return f"ALTER ROLE {identifier(role)} PASSWORD {literal(scram_verifier(password))}"
