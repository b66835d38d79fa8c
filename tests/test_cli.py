"""The `dbprov` command on a fresh data folder: commands that need the metadata
store migrate it first, and trouble reaches the user as a message, not a traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from service.store.crypto import generate_key


@pytest.fixture
def dbprov(tmp_path):
    """Runs a `dbprov` command, as a user does, with a data folder no service has ever used."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DBPROV_")}

    def run(*args: str, executable: bool = False, **env: str) -> subprocess.CompletedProcess:
        # ``executable``: args are the interpreter's own (-c CODE ...), not a command's.
        return subprocess.run(
            [sys.executable, *(args if executable else ("-m", "service", *args))],
            env={**base, "DBPROV_DATA_DIR": str(tmp_path / "fresh"), **env},
            capture_output=True, text=True, timeout=60,
        )

    return run


def test_token_and_tenant_commands_work_on_a_fresh_data_folder(dbprov):
    created = dbprov("tokens", "create", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("dbp_")
    listed = dbprov("tokens", "list")
    assert listed.returncode == 0 and "acme" in listed.stdout
    quota = dbprov("tenants", "quota", "acme", "--limit", "3")
    assert quota.returncode == 0 and quota.stdout == "acme: 0 of 3 databases\n"


@pytest.mark.parametrize("command", [["tokens", "list"], ["tenants", "quota", "acme"],
                                     ["keys", "rotate"]])
def test_each_store_command_migrates_first(dbprov, command):
    result = dbprov(*command)
    assert result.returncode == 0, result.stderr


def test_a_refusal_is_a_message(dbprov):
    result = dbprov("tokens", "revoke", "nosuchtoken")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "Error: no token with id 'nosuchtoken'"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::", "example.com"])
def test_serve_without_authentication_listens_on_loopback_only(dbprov, host):
    result = dbprov("serve", "--no-auth", "--host", host)
    assert result.returncode == 2
    assert f"--no-auth is only for loopback addresses, not {host}" in result.stderr


def test_reconcile_migrates_before_it_needs_the_engine(dbprov, tmp_path):
    result = dbprov("reconcile", "--once", DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert "Traceback" not in result.stderr and "no such table" not in result.stderr
    with sqlite3.connect(tmp_path / "fresh" / "dbprov.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)


def test_an_unreachable_store_is_a_message(dbprov):
    result = dbprov(
        "tokens", "list",
        DBPROV_DATABASE_URL="postgresql+psycopg://dbprov:secret@127.0.0.1:1/dbprov",
        DBPROV_SECRET_KEY=generate_key(),
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: metadata store unavailable: ")
    assert "secret" not in result.stderr


def test_tenant_plans_are_shown_set_and_checked(dbprov):
    plans = '{"small": {"memory": "256m"}}'
    dbprov("tokens", "create", "--tenant", "classroom")
    assert dbprov("tenants", "plans", "classroom", DBPROV_PLANS=plans).stdout == "classroom: every plan\n"
    held = dbprov("tenants", "plans", "classroom", "--allow", "small", DBPROV_PLANS=plans)
    assert held.returncode == 0 and held.stdout == "classroom: small\n"
    unknown = dbprov("tenants", "plans", "classroom", "--allow", "huge", DBPROV_PLANS=plans)
    assert unknown.returncode == 1 and "no such plans: huge" in unknown.stderr
    lifted = dbprov("tenants", "plans", "classroom", "--all", DBPROV_PLANS=plans)
    assert lifted.stdout == "classroom: every plan\n"


def test_the_worker_health_check_reads_the_heartbeat_and_imports_little(dbprov, tmp_path):
    missing = dbprov("worker", "--check")
    assert missing.returncode == 1
    assert missing.stderr == "Error: no reconcile pass completed yet\n"
    heartbeat = tmp_path / "fresh" / "worker.heartbeat"
    heartbeat.parent.mkdir()
    heartbeat.touch()
    assert dbprov("worker", "--check").stdout.startswith("last complete reconcile pass ")
    os.utime(heartbeat, (0, 0))
    assert "last complete reconcile pass" in dbprov("worker", "--check").stderr
    # A container's health check has seconds: the service's own modules cost that to import.
    shown = dbprov(
        "-c", "import runpy, sys\n"
        "try:\n    runpy.run_module('service', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('flask', 'sqlalchemy', 'docker', 'service.composition') if m in sys.modules))",
        "worker", "--check", executable=True,
    )
    assert shown.stdout.splitlines()[-1] == "[]", shown.stderr
