"""What dbprov does inside a tenant's PostgreSQL server, over its published port.

The tenant owns its database and everything in it, and may set defaults for
it and for its role (``ALTER DATABASE/ROLE ... SET``); a session the service
opens there could find look-alike catalogs first on its search path, or a
lock held open in its way. So, as PostgreSQL frames it (CVE-2018-1058, and
what pg_dump does for its own sessions), every session here:

- pins its settings in the startup packet (``SESSION_OPTIONS``), which takes
  precedence over whatever the tenant set for its database or role: a search
  path of ``pg_catalog, pg_temp``, and statement and lock timeouts;
- names catalogs with their schema all the same;
- works as the superuser only in the maintenance database (template1), which
  the tenant can neither connect to nor change; what must happen inside the
  tenant's own database (extensions, the restore's emptiness check, pg_dump,
  pg_restore) runs as the tenant's own login, so nothing the tenant planted
  there ever runs with more rights than the tenant has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import sql

from ..domain.models import Database
from ..errors import TransientError
from ..store.crypto import Vault
from .scram import scram_verifier

# How long the service waits for a lock in a tenant's server, and for a
# statement. Its own statements are catalog changes that take milliseconds;
# anything longer is a tenant holding a lock in the way (an open ALTER ROLE
# of its own, say), and the request fails after this instead of hanging
# inside a metadata transaction that others wait behind.
LOCK_TIMEOUT_MS = 3000
STATEMENT_TIMEOUT_MS = 30000
# The service's own sessions name themselves, so that the idle count leaves them out.
APPLICATION_NAME = "dbprov-service"
SESSION_OPTIONS = " ".join((
    "-c search_path=pg_catalog,pg_temp",
    f"-c lock_timeout={LOCK_TIMEOUT_MS}",
    f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
    # A tenant's database may be read-only by default; the service's own work is not.
    "-c default_transaction_read_only=off",
))


# The contrib extensions PostgreSQL marks trusted: a database owner may create them.
TRUSTED_EXTENSIONS = frozenset({
    "btree_gin", "btree_gist", "citext", "cube", "dict_int", "fuzzystrmatch", "hstore",
    "intarray", "isn", "lo", "ltree", "pgcrypto", "pg_trgm", "plpgsql", "seg", "tablefunc",
    "tcn", "tsm_system_rows", "tsm_system_time", "unaccent", "uuid-ossp",
})


@dataclass(frozen=True)
class ServerDatabase:
    """A database inside a tenant's server."""

    name: str
    owner: str
    bytes: int


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
        self, admin: Login, tenant: Login, parameters: dict[str, str], extensions: list[str]
    ) -> None:
        """The tenant's database has these settings (ALTER DATABASE ... SET, by
        ``admin`` from the maintenance database) and extensions (made by ``tenant``)."""

    def client_activity(self, admin: Login) -> tuple[int, int]:
        """How many clients other than the service are connected now, to any of
        the server's databases (one idle in a transaction counts like any
        other); and how many sessions its databases have had in all, which
        tells a client that came and went between two looks."""

    def checkpoint(self, admin: Login) -> None:
        """Write every changed page to the data files, so that a copy of them
        taken next has little write-ahead log to replay."""

    def user_relations(self, tenant: Login) -> int:
        """How many tables, views and sequences the tenant's database holds
        outside the system's schemas, asked as the tenant."""

    def databases(self, tenant: Login) -> list[ServerDatabase]:
        """The databases of the server the tenant may connect to, asked as the tenant."""

    def create_database(self, tenant: Login, name: str) -> None:
        """A new, empty database ``name`` of the tenant's, made as the tenant."""

    def drop_database(self, tenant: Login, name: str) -> None:
        """``name`` gone, if it exists, dropped as the tenant."""


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
                # Data initialised before servers were made with the tenant's
                # database (the reconciler's spec): the untouched initial
                # database becomes it.
                conn.execute(
                    sql.SQL("ALTER DATABASE postgres RENAME TO {}").format(sql.Identifier(database))
                )
            exists = _exists(conn, "pg_roles", "rolname", username)
            attributes = sql.SQL("LOGIN SUPERUSER" if superuser else _tenant_attributes(conn))
            verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
            conn.execute(
                sql.SQL("{} {} {} PASSWORD {}").format(
                    verb, role, attributes, sql.Literal(scram_verifier(password))
                )
            )
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), role))
            # The service's own sessions are in template1: no tenant's. The
            # tenant may use "postgres", as on any server: test runners such as
            # Django's connect there to make and drop their test databases.
            conn.execute("REVOKE CONNECT ON DATABASE template1 FROM PUBLIC")
            if not _exists(conn, "pg_database", "datname", "postgres"):
                conn.execute("CREATE DATABASE postgres")
            conn.execute("GRANT CONNECT ON DATABASE postgres TO PUBLIC")

    def set_password(self, admin: Login, username: str, password: str) -> None:
        with _connect(admin) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(username), sql.Literal(scram_verifier(password))
                )
            )

    def configure(
        self, admin: Login, tenant: Login, parameters: dict[str, str], extensions: list[str]
    ) -> None:
        if parameters:
            with _connect(admin) as conn:
                for name, value in parameters.items():
                    conn.execute(
                        sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                            sql.Identifier(tenant.dbname), sql.Identifier(name), sql.Literal(value)
                        )
                    )
        trusted = [name for name in extensions if name in TRUSTED_EXTENSIONS]
        # As the tenant where PostgreSQL lets a database owner make them: what
        # the tenant left in its database then meets no more than its own rights.
        # The others are the operator's choice (DBPROV_ALLOWED_EXTENSIONS) and
        # need the superuser, who makes them in the pinned session; the tenant
        # cannot drop what the superuser owns, so their scripts run once, the
        # first time, as extension scripts are written to be safe against.
        untrusted = [name for name in extensions if name not in trusted]
        for login, names in ((tenant, trusted), (dataclasses.replace(admin, dbname=tenant.dbname), untrusted)):
            if not names:
                continue
            with _connect(login) as conn:
                for extension in names:
                    conn.execute(
                        # Into public, as a create without a path would; the
                        # pinned path names only system schemas.
                        sql.SQL("CREATE EXTENSION IF NOT EXISTS {} SCHEMA public").format(
                            sql.Identifier(extension)
                        )
                    )

    def checkpoint(self, admin: Login) -> None:
        with _connect(admin) as conn:
            conn.execute("CHECKPOINT")

    def client_activity(self, admin: Login) -> tuple[int, int]:
        with _connect(admin) as conn:
            # The service's own sessions (a probe, a checkpoint, a rotation)
            # log in as the server's superuser and name themselves. Both, as
            # in servers made before tenants had roles of their own the
            # tenant logs in as that superuser too; a tenant that takes the
            # service's name only lets its own database sleep.
            row = conn.execute(
                "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity "
                "WHERE backend_type OPERATOR(pg_catalog.=) 'client backend' "
                "AND pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() "
                "AND NOT (usename OPERATOR(pg_catalog.=) CURRENT_USER "
                "AND application_name OPERATOR(pg_catalog.=) %s)",
                (APPLICATION_NAME,),
            ).fetchone()
            # The service's own sessions go to template1 (Login.dbname): its
            # count is left out. Counted as sessions end, or at least once a
            # second while they run.
            total = conn.execute(
                "SELECT pg_catalog.sum(sessions) FROM pg_catalog.pg_stat_database "
                "WHERE datname OPERATOR(pg_catalog.<>) 'template1'"
            ).fetchone()
        return int(row[0]), int(total[0] or 0)

    def user_relations(self, tenant: Login) -> int:
        with _connect(tenant) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
                "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
                "AND c.relkind IN ('r', 'v', 'm', 'S', 'p', 'f')"
            ).fetchone()
        return int(row[0])

    def databases(self, tenant: Login) -> list[ServerDatabase]:
        with _connect(tenant) as conn:
            rows = conn.execute(
                "SELECT datname, pg_catalog.pg_get_userbyid(datdba), pg_catalog.pg_database_size(oid) "
                "FROM pg_catalog.pg_database WHERE NOT datistemplate "
                "AND pg_catalog.has_database_privilege(oid, 'CONNECT') ORDER BY datname"
            ).fetchall()
        return [ServerDatabase(name, owner, int(size)) for name, owner, size in rows]

    def create_database(self, tenant: Login, name: str) -> None:
        with _connect(tenant) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, tenant: Login, name: str) -> None:
        with _connect(tenant) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


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


def tenant_login(record: Database, vault: Vault) -> Login:
    """The tenant's own login to its database, for the work done inside it."""
    return dataclasses.replace(
        admin_login(record, vault),
        user=record.username, password=vault.decrypt(record.password), dbname=record.database_name,
    )


def set_up_tenant(server_admin: ServerAdmin, record: Database, vault: Vault) -> None:
    """The tenant's role with its password inside the server, then the check that
    counts: ``SELECT 1`` as the tenant. Raises ``psycopg.Error``."""
    admin = admin_login(record, vault)
    tenant = tenant_login(record, vault)
    # Databases made before tenant roles existed have the tenant as superuser.
    if record.admin_username != record.username:
        server_admin.ensure_tenant_role(
            admin, record.username, tenant.password, record.database_name, record.superuser
        )
    if record.parameters or record.extensions:
        server_admin.configure(
            admin, tenant, dict(record.parameters or {}), list(record.extensions or [])
        )
    server_admin.check(tenant)


def _tenant_attributes(conn: psycopg.Connection) -> str:
    """What the tenant's role may do beyond its own database.

    CREATEDB: test runners (Django's, pytest-django, Rails, Prisma's shadow
    database) make databases of their own; on a server of its own the
    tenant's databases are only its own. CREATEROLE from PostgreSQL 16 on,
    where it is bounded: a role administers only the roles it made and
    grants only what it holds with ADMIN OPTION. Before 16 it would let the
    tenant grant itself pg_execute_server_program and the like: withheld.
    """
    createrole = "CREATEROLE" if conn.info.server_version >= 160000 else "NOCREATEROLE"
    return f"LOGIN NOSUPERUSER CREATEDB {createrole} NOREPLICATION NOBYPASSRLS"


def _exists(conn: psycopg.Connection, catalog: str, column: str, name: str) -> bool:
    query = sql.SQL("SELECT 1 FROM pg_catalog.{} WHERE {} = %s").format(
        sql.Identifier(catalog), sql.Identifier(column)
    )
    return conn.execute(query, (name,)).fetchone() is not None


def _connect(login: Login) -> psycopg.Connection:
    return psycopg.connect(
        host=login.host, port=login.port, user=login.user, password=login.password,
        dbname=login.dbname, connect_timeout=3, autocommit=True, options=SESSION_OPTIONS,
        application_name=APPLICATION_NAME,
    )
