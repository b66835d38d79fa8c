"""What dbprov does inside a tenant's PostgreSQL server, over its published port."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import sql

from .crypto import Vault, scram_verifier
from .errors import TransientError
from .models import Database


@dataclass(frozen=True)
class Login:
    host: str
    port: int
    user: str
    password: str = ""
    # template1 exists in every cluster: the service's own logins use it.
    dbname: str = "template1"

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

    def configure(
        self, admin: Login, database: str, parameters: dict[str, str], extensions: list[str]
    ) -> None:
        """``database`` has these settings (ALTER DATABASE ... SET) and extensions."""

    def client_connections(self, admin: Login, database: str) -> int:
        """How many clients other than the service are connected to ``database``."""

    def user_relations(self, login: Login) -> int:
        """How many tables, views and sequences the logged-in database holds outside the system's schemas."""


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
            if not _exists(conn, "pg_database", "datname", database):
                # The server was initialised without it (see the reconciler's
                # container spec): the untouched initial database becomes it.
                conn.execute(
                    sql.SQL("ALTER DATABASE postgres RENAME TO {}").format(sql.Identifier(database))
                )
            exists = _exists(conn, "pg_roles", "rolname", username)
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
            # A tenant works in its own database; the others are the service's.
            conn.execute("REVOKE CONNECT ON DATABASE template1 FROM PUBLIC")
            if _exists(conn, "pg_database", "datname", "postgres"):
                conn.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")

    def set_password(self, admin: Login, username: str, password: str) -> None:
        with _connect(admin) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(username), sql.Literal(scram_verifier(password))
                )
            )


    def configure(
        self, admin: Login, database: str, parameters: dict[str, str], extensions: list[str]
    ) -> None:
        with _connect(admin) as conn:
            for name, value in parameters.items():
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                        sql.Identifier(database), sql.Identifier(name), sql.Literal(value)
                    )
                )
        if extensions:
            # Inside the tenant's database, made by the service: the tenant owns
            # the database but need not be allowed to create them itself.
            with _connect(dataclasses.replace(admin, dbname=database)) as conn:
                for extension in extensions:
                    conn.execute(
                        sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension))
                    )

    def client_connections(self, admin: Login, database: str) -> int:
        with _connect(admin) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()
        return int(row[0])


    def user_relations(self, login: Login) -> int:
        with _connect(login) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
                "AND c.relkind IN ('r', 'v', 'm', 'S', 'p', 'f')"
            ).fetchone()
        return int(row[0])


def admin_login(record: Database, vault: Vault) -> Login:
    """The service's own login to a database's server."""
    if record.server_host is None:
        # Recorded when the server is provisioned, or by the next reconcile
        # pass for records older than the column.
        raise TransientError(f"where the server of {record.id} answers is not known yet")
    return Login(
        host=record.server_host,
        port=record.host_port,
        user=record.admin_username,
        password=vault.decrypt(record.admin_password),
    )


def set_up_tenant(server_admin: ServerAdmin, record: Database, vault: Vault) -> None:
    """The tenant's role with its password inside the server, then the check that
    counts: ``SELECT 1`` as the tenant. Raises ``psycopg.Error``."""
    password = vault.decrypt(record.password)
    admin = admin_login(record, vault)
    # Databases made before tenant roles existed have the tenant as superuser.
    if record.admin_username != record.username:
        server_admin.ensure_tenant_role(
            admin, record.username, password, record.database_name, record.superuser
        )
    if record.parameters or record.extensions:
        server_admin.configure(
            admin, record.database_name, dict(record.parameters or {}), list(record.extensions or [])
        )
    server_admin.check(
        dataclasses.replace(
            admin, user=record.username, password=password, dbname=record.database_name
        )
    )


def _exists(conn: psycopg.Connection, catalog: str, column: str, name: str) -> bool:
    query = sql.SQL("SELECT 1 FROM {} WHERE {} = %s").format(
        sql.Identifier(catalog), sql.Identifier(column)
    )
    return conn.execute(query, (name,)).fetchone() is not None


def _connect(login: Login) -> psycopg.Connection:
    return psycopg.connect(
        host=login.host, port=login.port, user=login.user, password=login.password,
        dbname=login.dbname, connect_timeout=3, autocommit=True,
    )
