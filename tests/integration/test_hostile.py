"""A hostile tenant against the real engine: whatever it plants in its own
server waits for the service's next session there, and must get nothing.

The plant: a schema ``shadow`` first on the search path of the tenant's
database and role, holding views named like the catalogs the service reads,
look-alike functions and operators (in ``public`` too, which extension
scripts search), all calling ``trap()``. ``trap()`` undoes any ``SET ROLE``,
and if it then runs as a superuser it makes the tenant one, changes the
superuser's password, and counts itself in a sequence (which no rollback
undoes). Every endpoint and background task that acts inside the tenant's
server runs against it; afterwards the tenant is no superuser, the count is
0, and the service still logs in as before.
"""

from __future__ import annotations

import sys
import threading
import time

import psycopg
import pytest

from .conftest import ServiceProcess, wait_until

pytestmark = pytest.mark.docker

ADMIN = "dbprov_admin"

PLANT = """
CREATE SEQUENCE public.ran_as_superuser;
CREATE FUNCTION public.trap() RETURNS boolean LANGUAGE plpgsql AS $trap$
BEGIN
    BEGIN
        RESET ROLE;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) current_user) THEN
        PERFORM pg_catalog.nextval('public.ran_as_superuser');
        EXECUTE 'ALTER ROLE app SUPERUSER';
        EXECUTE pg_catalog.format('ALTER ROLE %I PASSWORD %L', current_user, 'taken');
    END IF;
    RETURN true;
END
$trap$;
CREATE SCHEMA shadow;
CREATE VIEW shadow.pg_class AS SELECT * FROM pg_catalog.pg_class WHERE public.trap();
CREATE VIEW shadow.pg_namespace AS SELECT * FROM pg_catalog.pg_namespace WHERE public.trap();
CREATE VIEW shadow.pg_stat_activity AS SELECT * FROM pg_catalog.pg_stat_activity WHERE public.trap();
CREATE VIEW shadow.pg_roles AS SELECT * FROM pg_catalog.pg_roles WHERE public.trap();
CREATE VIEW shadow.pg_database AS SELECT * FROM pg_catalog.pg_database WHERE public.trap();
CREATE VIEW shadow.pg_extension AS SELECT * FROM pg_catalog.pg_extension WHERE public.trap();
CREATE FUNCTION shadow.pg_backend_pid() RETURNS integer LANGUAGE sql
    AS 'SELECT pg_catalog.pg_backend_pid() WHERE public.trap()';
CREATE FUNCTION shadow.version() RETURNS text LANGUAGE sql
    AS 'SELECT pg_catalog.version() WHERE public.trap()';
CREATE FUNCTION shadow.set_config(text, text, boolean) RETURNS text LANGUAGE sql
    AS 'SELECT pg_catalog.set_config($1, $2, $3) WHERE public.trap()';
"""
# Look-alike equality operators, in both schemas, for the types catalog
# queries compare (an exact match wins over pg_catalog's when searched first).
OPERATORS = [
    ("oid", "oid", "oideq"), ("name", "name", "nameeq"), ("name", "text", "nameeqtext"),
    ("text", "text", "texteq"), ("char", "char", "chareq"),
]
HOSTILE_PATH = "shadow, public, pg_catalog"


def plant(uri: str) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(PLANT)
        for schema in ("shadow", "public"):
            for left, right, builtin in OPERATORS:
                function = f"{schema}.trap_{builtin}"
                conn.execute(
                    f'CREATE FUNCTION {function}("{left}", "{right}") RETURNS boolean LANGUAGE sql '
                    f"AS 'SELECT public.trap() AND pg_catalog.{builtin}($1, $2)'"
                )
                conn.execute(
                    f'CREATE OPERATOR {schema}.= (LEFTARG = "{left}", RIGHTARG = "{right}", '
                    f"FUNCTION = {function})"
                )
        conn.execute(f"ALTER DATABASE app SET search_path = {HOSTILE_PATH}")
        conn.execute(f"ALTER ROLE app SET search_path = {HOSTILE_PATH}")
    # The plant is live: a session that takes the defaults finds the look-alikes.
    with psycopg.connect(uri) as conn:
        assert conn.execute("SHOW search_path").fetchone() == (HOSTILE_PATH,)
        assert conn.execute(
            "SELECT pg_get_viewdef('shadow.pg_class'::regclass) LIKE '%trap()%'"
        ).fetchone() == (True,)
        assert conn.execute("SELECT count(*) > 0 FROM pg_class").fetchone() == (True,)


def assert_not_escalated(uri: str) -> None:
    with psycopg.connect(uri, options="-c search_path=pg_catalog", connect_timeout=10) as conn:
        supers = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles WHERE rolsuper")}
        assert supers == {ADMIN}, f"superusers now: {supers}"
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (ADMIN,)).fetchone() == (True,)
        if conn.execute("SELECT to_regclass('public.ran_as_superuser')").fetchone()[0]:
            assert conn.execute("SELECT is_called FROM public.ran_as_superuser").fetchone() == (False,), (
                "the service ran the tenant's code as superuser"
            )


@pytest.fixture
def hostile(docker_client, tmp_path):
    """`dbprov serve` with authentication on, the idle check running on every
    pass, and an extension beyond the trusted ones allowed."""
    service = ServiceProcess(tmp_path, {
        "DBPROV_IDLE_STOP": "3600",
        "DBPROV_ALLOWED_EXTENSIONS": "pg_stat_statements",
    })
    service.start([sys.executable, "-m", "service", "serve", "--port", str(service.port)])
    tokens = {name: service.create_token(name) for name in ("mallory", "alice")}
    service.token = service.create_token("ops", admin=True)
    yield service, tokens
    service.delete_all()
    service.stop()


def create(service, token, **body) -> dict:
    response = service.request("POST", "/databases", token=token, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_planted_tenant_gets_nothing_from_any_session_of_the_service(hostile):
    service, tokens = hostile
    mallory = tokens["mallory"]
    victim = create(service, mallory, extensions=["pg_trgm"])
    uri = victim["connection_uri"]
    plant(uri)
    path = f"/databases/{victim['id']}"

    def acted(method: str, suffix: str, expect: int = 200, **kwargs) -> str:
        """The tenant's URI after the request (a rotation changes it)."""
        response = service.request(method, path + suffix, token=mallory, **kwargs)
        assert response.status_code == expect, f"{method} {suffix}: {response.status_code} {response.text}"
        now = response.json().get("connection_uri") or uri
        assert_not_escalated(now)
        return now

    # The restore's emptiness check: the finding that made a tenant superuser.
    acted("POST", "/restore", expect=409, data=b"anything",
          headers={"Content-Type": "application/octet-stream"})
    archive = service.request("GET", path + "/dump", token=mallory).content
    assert archive.startswith(b"PGDMP")
    assert_not_escalated(uri)
    uri = acted("POST", "/credentials/rotate")
    snapshot = service.request("POST", path + "/snapshots", token=mallory, json={})
    assert snapshot.status_code in (201, 202), snapshot.text
    snapshot_id = snapshot.json()["id"]
    wait_until(
        lambda: service.request("GET", f"/snapshots/{snapshot_id}", token=mallory).json()["status"] == "ready",
        what="the snapshot",
    )
    assert_not_escalated(uri)
    assert service.request("POST", path + "/stop", token=mallory).status_code in (200, 202)
    service.wait_for_status(victim["id"], "stopped")
    assert service.request("POST", path + "/start", token=mallory).status_code in (200, 202)
    service.wait_for_status(victim["id"], "ready")
    assert_not_escalated(uri)
    acted("POST", "/reset", json={"snapshot": snapshot_id})

    # A clone carries the plant into a new server, where the service sets up
    # the role, settings and extensions (a trusted one as the tenant, and one
    # only the superuser can make).
    for body in ({"from_snapshot": snapshot_id}, {"from_database": victim["id"]}):
        clone = create(service, mallory, **body, parameters={"work_mem": "8MB"},
                       extensions=["pg_trgm", "hstore", "pg_stat_statements"])
        assert_not_escalated(clone["connection_uri"])
        with psycopg.connect(clone["connection_uri"]) as conn:
            installed = {row[0] for row in conn.execute("SELECT extname FROM pg_catalog.pg_extension")}
        assert {"hstore", "pg_stat_statements"} <= installed

    # A template filled with the plant, and a clone of it.
    begun = service.request("POST", "/templates", token=mallory, json={"key": "hostile"})
    assert begun.status_code == 201, begun.text
    plant(begun.json()["database"]["connection_uri"])
    finalized = service.request("POST", "/templates/hostile/finalize", token=mallory, json={"pool_size": 1})
    assert finalized.status_code == 200 and finalized.json()["status"] == "ready", finalized.text
    templated = create(service, mallory, template="hostile", extensions=["citext"])
    assert_not_escalated(templated["connection_uri"])

    # The idle check has run on every pass meanwhile; the service still logs
    # in as before (a rotation is the superuser's work).
    assert_not_escalated(uri)
    acted("POST", "/credentials/rotate")


def test_a_restored_archive_runs_as_the_tenant_whatever_it_holds(hostile):
    """An archive's own SQL (a CHECK that calls ``trap()`` for every row copied,
    and ``trap()``'s RESET ROLE) meets only the tenant's rights."""
    service, tokens = hostile
    mallory = tokens["mallory"]
    source = create(service, mallory)
    with psycopg.connect(source["connection_uri"], autocommit=True) as conn:
        conn.execute(PLANT)
        conn.execute("CREATE TABLE armed (id int CHECK (public.trap()))")
        conn.execute("INSERT INTO armed SELECT generate_series(1, 10)")
    archive = service.request("GET", f"/databases/{source['id']}/dump", token=mallory).content
    target = create(service, mallory)
    restored = service.request("POST", f"/databases/{target['id']}/restore", token=mallory, data=archive,
                               headers={"Content-Type": "application/octet-stream"})
    assert restored.status_code == 200, restored.text
    with psycopg.connect(target["connection_uri"]) as conn:
        assert conn.execute("SELECT count(*) FROM armed").fetchone() == (10,)
    assert_not_escalated(target["connection_uri"])


ESCALATIONS = [
    "COPY (SELECT 1) TO PROGRAM 'id'",
    "SELECT pg_read_file('/proc/self/environ')",
    "SELECT pg_ls_dir('.')",
    "SELECT rolpassword FROM pg_authid",
    "ALTER SYSTEM SET work_mem = '1MB'",
    f"SET ROLE {ADMIN}",
    f"SET SESSION AUTHORIZATION {ADMIN}",
    "GRANT pg_execute_server_program TO app",
    "GRANT pg_read_server_files TO app",
    "GRANT pg_write_server_files TO app",
    f"GRANT {ADMIN} TO app",
    "ALTER ROLE app SUPERUSER",
    "ALTER ROLE app BYPASSRLS",
    f"ALTER ROLE {ADMIN} PASSWORD 'taken'",
    "CREATE ROLE intruder SUPERUSER",
    "CREATE EXTENSION plpython3u",
    "LOAD 'plpython3u'",
    "SET session_preload_libraries = 'auto_explain'",
    "SELECT pg_reload_conf()",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename <> current_user",
]


@pytest.mark.parametrize("version", ["15", "17"])
def test_the_usual_escalations_are_refused(hostile, version):
    service, tokens = hostile
    created = create(service, tokens["mallory"], version=version)
    with psycopg.connect(created["connection_uri"], autocommit=True) as conn:
        for statement in ESCALATIONS:
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(statement)
            assert isinstance(refused.value, (
                psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFile,
                psycopg.errors.FeatureNotSupported,
            )) or "permission denied" in str(refused.value), (statement, refused.value)
    assert_not_escalated(created["connection_uri"])


@pytest.mark.parametrize("version", ["15", "17"])
def test_databases_and_roles_of_its_own_stay_within_the_tenants_rights(hostile, version):
    """CREATEDB everywhere; CREATEROLE only where PostgreSQL bounds it (16 and
    later): the roles it makes get no more than it holds."""
    service, tokens = hostile
    created = create(service, tokens["mallory"], version=version)
    with psycopg.connect(created["connection_uri"], autocommit=True) as conn:
        conn.execute("CREATE DATABASE app_test")
        conn.execute("CREATE DATABASE app_copy TEMPLATE app_test")
        owners = dict(conn.execute(
            "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE 'app_%'"
        ).fetchall())
        assert owners == {"app_test": "app", "app_copy": "app"}
        conn.execute("DROP DATABASE app_copy")
        if version == "15":
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE ROLE helper LOGIN")
        else:
            conn.execute("CREATE ROLE helper LOGIN PASSWORD 'helper-password'")
            conn.execute("GRANT CONNECT ON DATABASE app_test TO helper")
            for statement in (
                "GRANT pg_execute_server_program TO helper",
                "GRANT pg_read_server_files TO helper",
                f"GRANT {ADMIN} TO helper",
                "ALTER ROLE helper SUPERUSER",
                "ALTER ROLE helper REPLICATION",
                f"ALTER ROLE {ADMIN} NOLOGIN",
                f"DROP ROLE {ADMIN}",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
            conn.execute("REVOKE CONNECT ON DATABASE app_test FROM helper")
            conn.execute("DROP ROLE helper")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP DATABASE template1")
    assert_not_escalated(created["connection_uri"])


def test_a_tenants_lock_delays_the_service_and_others_by_at_most_the_timeout(hostile):
    service, tokens = hostile
    mallory, alice = tokens["mallory"], tokens["alice"]
    held = create(service, mallory)
    other = create(service, alice)
    # An ALTER ROLE of its own, left open: the rotation's ALTER ROLE waits on it.
    blocker = psycopg.connect(held["connection_uri"])
    blocker.execute("ALTER ROLE app PASSWORD 'still-mine-for-now'")
    try:
        answers: dict[str, tuple[int, float]] = {}

        def rotate(name: str, token: str, database_id: str) -> None:
            started = time.monotonic()
            response = service.request("POST", f"/databases/{database_id}/credentials/rotate", token=token)
            answers[name] = (response.status_code, time.monotonic() - started)

        stalled = threading.Thread(target=rotate, args=("mallory", mallory, held["id"]))
        stalled.start()
        time.sleep(0.5)
        rotate("alice", alice, other["id"])
        stalled.join(timeout=60)
        assert not stalled.is_alive()
    finally:
        blocker.rollback()
        blocker.close()
    # The lock timeout is 3 s; the rest is a connection and a metadata write.
    status, took = answers["mallory"]
    assert status == 502 and took < 8, answers
    status, took = answers["alice"]
    assert status == 200 and took < 8, answers
    # The refused rotation changed nothing: the old password still works.
    with psycopg.connect(held["connection_uri"], connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert service.request("POST", f"/databases/{held['id']}/credentials/rotate", token=mallory).status_code == 200
