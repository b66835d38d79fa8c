"""Real clients, unchanged, against databases from `dbprov new --wait`: the
tools a team points at a database on demand first. Each test is one row of
the README's "Works with" table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from service.domain.databases import Credentials

from .conftest import ROOT

pytestmark = pytest.mark.docker

DBPROV = str(Path(sys.executable).with_name("dbprov"))
DJANGO_PROJECT = ROOT / "tests" / "compat" / "django_app"
# The server's own client tools, from the server's image: their versions match it.
TOOLS_IMAGE = "postgres:17"


@pytest.fixture
def dbprov(service, tmp_path):
    """The `dbprov` command as a shell user runs it against the service: its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBPROV_")}
    env.update(DBPROV_URL=service.url, XDG_CONFIG_HOME=str(tmp_path / "config"))

    def command(*args: str) -> str:
        done = subprocess.run([DBPROV, *args], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return command


@pytest.fixture
def new(dbprov):
    """`dbprov new --wait`: the URI it prints."""
    return lambda *args: dbprov("new", "--wait", *args).splitlines()[-1]


def run(command: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def tool(*command: str, input: bytes | None = None) -> bytes:
    """A PostgreSQL client tool from the server's image, on the host's network."""
    interactive = ["-i"] if input is not None else []
    result = subprocess.run(
        ["docker", "run", "--rm", *interactive, "--network", "host", TOOLS_IMAGE, *command],
        input=input, capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def django_env(uri: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": uri, "PYTHONPATH": str(DJANGO_PROJECT)}


def test_djangos_test_runner_makes_its_test_databases(new):
    uri = new()
    result = run([sys.executable, "manage.py", "test", "ledger", "--parallel", "2", "--noinput", "-v", "2"],
                 cwd=DJANGO_PROJECT, env=django_env(uri))
    output = result.stdout + result.stderr
    assert "Creating test database for alias 'default'" in output
    # --parallel 2: a copy of the test database per process, made from it.
    assert "Cloning test database for alias 'default'" in output
    assert "Ran 4 tests" in output and "\nOK" in output
    with psycopg.connect(uri) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'test_%'").fetchall()
    assert left == []


def test_pytest_django_creates_its_database(new):
    uri = new()
    result = run([sys.executable, "-m", "pytest", "--create-db", "-q", "test_with_pytest.py"],
                 cwd=DJANGO_PROJECT, env=django_env(uri))
    assert "2 passed" in result.stdout


def test_an_alembic_migration_runs(new, tmp_path):
    uri = new()
    alembic = [sys.executable, "-m", "alembic"]
    run([*alembic, "init", "migrations"], cwd=tmp_path)
    ini = tmp_path / "alembic.ini"
    url = uri.replace("postgresql://", "postgresql+psycopg://", 1).replace("%", "%%")
    ini.write_text(ini.read_text().replace("driver://user:pass@localhost/dbname", url))
    (tmp_path / "migrations" / "versions" / "0001_accounts.py").write_text(
        'from alembic import op\nimport sqlalchemy as sa\n\nrevision = "0001"\ndown_revision = None\n\n'
        "def upgrade():\n"
        '    op.create_table("account", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text))\n'
        '    op.create_index("account_name", "account", ["name"])\n\n'
        'def downgrade():\n    op.drop_table("account")\n'
    )
    run([*alembic, "upgrade", "head"], cwd=tmp_path)
    with psycopg.connect(uri) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
        assert conn.execute("SELECT count(*) FROM account").fetchone() == (0,)
    run([*alembic, "downgrade", "base"], cwd=tmp_path)


def test_pg_dump_and_pg_restore_with_the_tenants_own_credentials(new):
    source, target = new(), new()
    with psycopg.connect(source) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO item SELECT i, 'item ' || i FROM generate_series(1, 300) i")
    archive = tool("pg_dump", "--format=custom", source)
    assert archive.startswith(b"PGDMP")
    tool("pg_restore", "--no-owner", "--exit-on-error", f"--dbname={target}", input=archive)
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*), max(id) FROM item").fetchone() == (300, 300)


def test_psql_lists_databases_and_roles(new):
    uri = new()
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE DATABASE app_reports")
    databases = tool("psql", uri, "-X", "-c", r"\l").decode()
    assert " app " in databases and "app_reports" in databases
    roles = tool("psql", uri, "-X", "-c", r"\du").decode()
    assert "app" in roles and "Create DB" in roles


@pytest.mark.skipif(not shutil.which("npm") and not os.environ.get("CI"), reason="no Node.js here")
def test_nodes_pg_connects_with_the_uri_as_printed(new, dbprov, tmp_path):
    # 17: the tenant makes a role of its own (CREATEROLE is bounded from 16 on)
    # whose password needs percent-encoding, in a URI made the way dbprov
    # prints its own.
    uri = new("--version", "17")
    parts = urlsplit(uri)
    odd_password = "p@ss:w/rd %?#&=ü+"
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE odd LOGIN PASSWORD {}").format(sql.Literal(odd_password)))
        conn.execute("GRANT CONNECT ON DATABASE app TO odd")
    odd = Credentials("odd", odd_password, "app", parts.hostname, parts.port).connection_uri
    assert "%40" in odd and "%C3%BC" in odd
    package = tmp_path / "node"
    package.mkdir()
    ca = tmp_path / "ca.pem"
    ca.write_text(dbprov("ca"))
    run(["npm", "install", "--no-audit", "--no-fund", "--silent", "pg@8"], cwd=package, timeout=300)
    (package / "check.js").write_text(
        "const { Client } = require('pg');\n"
        "(async () => {\n"
        "  for (const connectionString of process.argv.slice(2)) {\n"
        "    const client = new Client({ connectionString });\n"
        "    await client.connect();\n"
        "    const { rows } = await client.query(\n"
        "      'SELECT current_user AS who, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()');\n"
        "    console.log(JSON.stringify(rows[0]));\n"
        "    await client.end();\n"
        "  }\n"
        "})().catch((error) => { console.error(error.message); process.exit(1); });\n"
    )
    verified = f"{uri}?sslmode=verify-full&sslrootcert={ca}"
    result = run(["node", "check.js", uri, verified, odd], cwd=package)
    plain, checked, encoded = result.stdout.strip().splitlines()
    assert json.loads(plain)["who"] == "app"
    assert json.loads(encoded)["who"] == "odd"
    # verify-full: the server's certificate, for the host the URI names, signed by the service's CA.
    assert json.loads(checked) == {"who": "app", "ssl": True}
