"""What dbprov does inside a tenant's PostgreSQL server, over its published port."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import sql

from .crypto import scram_verifier


@dataclass(frozen=True)
class Login:
    host: str
    port: int
    user: str
    password: str = ""
    dbname: str = "postgres"

    def __repr__(self) -> str:
        # Never show the password, should a Login end up in a log line or traceback.
        return f"Login({self.user}@{self.host}:{self.port}/{self.dbname})"


class ServerAdmin(Protocol):
    """The SQL side of provisioning; a fake stands in for it in the fast tests."""

    def check(self, login: Login) -> None:
        """Raise ``psycopg.Error`` unless ``SELECT 1`` succeeds with ``login``."""

    def ensure_tenant_role(
        self, admin: Login, username: str, password: str, database: str, superuser: bool
    ) -> None:
        """The tenant's role exists with ``password`` and owns ``database``."""

    def set_password(self, admin: Login, username: str, password: str) -> None: ...


class PostgresAdmin:
    def check(self, login: Login) -> None:
        with _connect(login) as conn:
            conn.execute("SELECT 1").fetchone()

    def ensure_tenant_role(
        self, admin: Login, username: str, password: str, database: str, superuser: bool
    ) -> None:
        role = sql.Identifier(username)
        # Repeatable: a crash after any statement is mended by running it all again.
        with _connect(admin) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)).fetchone()
            attributes = sql.SQL(
                "LOGIN SUPERUSER" if superuser else "LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION"
            )
            verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
            conn.execute(
                sql.SQL("{} {} {} PASSWORD {}").format(
                    verb, role, attributes, sql.Literal(scram_verifier(password))
                )
            )
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), role))
            # A tenant works in its own database; the maintenance ones are the service's.
            conn.execute("REVOKE CONNECT ON DATABASE postgres, template1 FROM PUBLIC")

    def set_password(self, admin: Login, username: str, password: str) -> None:
        with _connect(admin) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(username), sql.Literal(scram_verifier(password))
                )
            )


def _connect(login: Login) -> psycopg.Connection:
    return psycopg.connect(
        host=login.host, port=login.port, user=login.user, password=login.password,
        dbname=login.dbname, connect_timeout=3, autocommit=True,
    )
