"""The `dbprov` client commands against the stand-in API: what goes to standard
output and error, exit statuses, login, and the server's commands loaded from
the `dbprov.commands` entry points."""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points, requires

import pytest
from click.testing import CliRunner

from dbprov_client import cli as cli_module
from dbprov_client.cli import make_cli

from .fake import CA_PEM

EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_UNAVAILABLE = 3, 4, 5
DBPROV = [sys.executable, "-m", "dbprov_client"]


@pytest.fixture
def dbprov(fake, isolated):
    """Runs a client command in this process, against the stand-in."""
    runner = CliRunner()
    env = {"DBPROV_URL": fake.url, "DBPROV_TOKEN": None}

    def run(*args: str, **extra_env: str):
        return runner.invoke(make_cli(plugins=False), list(args), env={**env, **extra_env})

    return run


def subprocess_env(fake, isolated) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBPROV_")}
    return {**env, "DBPROV_URL": fake.url, "XDG_CONFIG_HOME": str(isolated / "config")}


def test_new_prints_only_the_uri_on_standard_output(dbprov, fake):
    result = dbprov("new", "--version", "17", "--name", "orders", "--ttl", "30m", "--plan", "default")
    assert result.exit_code == 0, result.output
    database = next(iter(fake.databases.values()))
    assert result.stdout == database.uri() + "\n"
    assert result.stderr == ""  # no progress: standard error is no terminal here
    assert fake.requests_to("POST", "/databases")[0].body == {
        "version": "17", "name": "orders", "plan": "default", "ttl": 1800}


@pytest.mark.parametrize(("given", "sent"), [(("--idle-stop", "5m"), 300), (("--idle-stop", "never"), None)])
def test_new_asks_for_an_idle_stop_or_none_and_leaves_it_out_unless_given(dbprov, fake, given, sent):
    assert dbprov("new", *given).exit_code == 0
    assert dbprov("new").exit_code == 0
    first, second = (request.body for request in fake.requests_to("POST", "/databases"))
    assert first == {"idle_stop": sent} and second == {}
    assert dbprov("new", "--idle-stop", "soon").exit_code == 2


def test_new_asks_for_a_server_that_does_not_sync_only_when_told(dbprov, fake):
    assert dbprov("new", "--not-durable").exit_code == 0
    assert dbprov("new").exit_code == 0
    first, second = (request.body for request in fake.requests_to("POST", "/databases"))
    assert first == {"durable": False} and second == {}


def test_new_json_prints_the_whole_record(dbprov, fake):
    result = dbprov("new", "--json")
    record = json.loads(result.stdout)
    assert record["status"] == "ready" and record["connection_uri"] and record["password"]


def test_new_no_wait_answers_while_it_provisions(dbprov, fake):
    fake.provision_seconds = 30
    result = dbprov("new", "--no-wait")
    assert result.exit_code == 0 and result.stdout.startswith("postgresql://")
    assert fake.requests_to("POST", "/databases")[0].headers["Prefer"] == "respond-async"


def test_a_bad_duration_is_a_usage_error(dbprov):
    result = dbprov("new", "--ttl", "soon")
    assert result.exit_code == 2 and "not a duration" in result.stderr


@pytest.mark.parametrize(("status", "code"), [
    (401, EXIT_REFUSED), (403, EXIT_REFUSED), (409, EXIT_REFUSED), (422, EXIT_REFUSED),
    (500, EXIT_UNAVAILABLE), (502, EXIT_UNAVAILABLE), (503, EXIT_UNAVAILABLE),
])
def test_problems_are_one_line_with_an_exit_status_per_kind(dbprov, fake, status, code):
    fake.fail("POST", "/databases", status, {
        "type": "urn:dbprov:problem:x", "title": "The title", "status": status,
        "detail": "first line\nsecond line"}, headers={"Retry-After": "0"}, times=10)
    result = dbprov("new")
    assert result.exit_code == code
    assert result.stdout == ""
    assert result.stderr == "Error: The title: first line | second line\n"


def test_not_found_has_its_own_exit_status(dbprov):
    result = dbprov("show", "nosuch")
    assert result.exit_code == EXIT_NOT_FOUND
    assert result.stderr == "Error: Not found: no database with id 'nosuch'\n"


def test_no_server_is_unavailable(isolated):
    result = CliRunner().invoke(make_cli(plugins=False), ["stop", "abc"],
                                env={"DBPROV_URL": "http://127.0.0.1:1"})
    assert result.exit_code == EXIT_UNAVAILABLE
    assert result.stderr.startswith("Error: Service unavailable: no answer from http://127.0.0.1:1")


def test_the_other_commands(dbprov, fake):
    uri = dbprov("new", "--name", "kept", "--ttl", "10m").stdout.strip()
    database_id = next(iter(fake.databases))
    dbprov("new", "--name", "gone")
    gone_id = list(fake.databases)[1]

    listing = dbprov("ls").stdout.splitlines()
    assert listing[0].split() == ["ID", "NAME", "STATUS", "VERSION", "PORT", "AGE", "EXPIRES"]
    assert [line.split()[0] for line in listing[1:]] == [gone_id, database_id]
    assert "in 9m" in listing[2] and "never" in listing[1]

    assert dbprov("rm", gone_id, "--wait").stdout == f"{gone_id} deleted\n"
    assert gone_id not in dbprov("ls").stdout
    assert gone_id in dbprov("ls", "--all").stdout
    assert [d["id"] for d in json.loads(dbprov("ls", "--json").stdout)] == [database_id]

    shown = dbprov("show", database_id).stdout
    assert f"id:         {database_id}" in shown and "status:     ready" in shown
    assert json.loads(dbprov("show", database_id, "--json").stdout)["name"] == "kept"
    assert dbprov("url", database_id).stdout == uri + "\n"
    assert dbprov("renew", database_id, "--ttl", "1h").stdout.startswith(f"{database_id} expires 20")
    assert fake.requests_to("PATCH", f"/databases/{database_id}")[-1].body == {"ttl": 3600}
    assert dbprov("stop", database_id).stdout == f"{database_id} stopped\n"
    assert dbprov("start", database_id).stdout == f"{database_id} ready\n"
    rotated = dbprov("rotate", database_id).stdout.strip()
    assert rotated.startswith("postgresql://") and rotated != uri
    assert "requested" in dbprov("events", database_id).stdout
    assert json.loads(dbprov("events", database_id, "--json").stdout)[0]["kind"] == "requested"
    assert dbprov("logs", database_id, "--tail", "2").stdout == "log line 0\nlog line 1\n"


def test_ca_prints_the_certificate_authoritys_certificate_as_served(dbprov, fake):
    fake.token = "dbp_secret"
    result = dbprov("ca")
    assert result.exit_code == 0, result.output
    assert result.stdout == CA_PEM


def test_storage_names_the_backend_and_for_an_admin_why(dbprov, fake):
    result = dbprov("storage")
    assert result.exit_code == 0, result.output
    assert result.stdout == "copy\n"
    fake.storage = {"backend": "btrfs", "reason": "the btrfs directory /srv/pool", "pool": "/srv/pool",
                    "free_bytes": 3 * 2**30, "size_bytes": 64 * 2**30}
    result = dbprov("storage")
    assert result.stdout.splitlines() == [
        "btrfs", "why: the btrfs directory /srv/pool", "free: 3.0 GiB of 64.0 GiB in /srv/pool",
    ]
    assert json.loads(dbprov("storage", "--json").stdout) == fake.storage


def test_login_stores_url_and_token_readable_by_the_user_alone(fake, isolated):
    fake.token = "dbp_secret"
    runner = CliRunner()
    refused = runner.invoke(make_cli(plugins=False), ["login", "--url", fake.url], input="dbp_wrong\n")
    assert refused.exit_code == EXIT_REFUSED
    path = isolated / "config" / "dbprov" / "client.json"
    assert not path.exists()

    result = runner.invoke(make_cli(plugins=False), ["login", "--url", fake.url], input="dbp_secret\n")
    assert result.exit_code == 0, result.output
    assert "dbp_secret" not in result.output  # asked for without echo
    assert json.loads(path.read_text()) == {"url": fake.url, "token": "dbp_secret"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The commands now find both without DBPROV_URL or DBPROV_TOKEN.
    listed = runner.invoke(make_cli(plugins=False), ["ls"])
    assert listed.exit_code == 0, listed.output
    assert fake.seen[-1].headers["Authorization"] == "Bearer dbp_secret"


def test_the_console_script_prints_the_uri_as_its_last_line(fake, isolated):
    result = subprocess.run([*DBPROV, "new", "--ttl", "5m"], env=subprocess_env(fake, isolated),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [next(iter(fake.databases.values())).uri()]
    assert result.stderr == ""
    missing = subprocess.run([*DBPROV, "url", "nosuch"], env=subprocess_env(fake, isolated),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == EXIT_NOT_FOUND and missing.stdout == ""


def test_on_a_terminal_a_progress_line_goes_to_standard_error_only(fake, isolated):
    fake.provision_seconds = 1.0
    leader, follower = pty.openpty()
    process = subprocess.Popen([*DBPROV, "new"], env=subprocess_env(fake, isolated),
                               stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    terminal = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        terminal += chunk
    stdout = process.communicate(timeout=30)[0]
    os.close(leader)
    database = next(iter(fake.databases.values()))
    assert process.returncode == 0
    assert stdout == database.uri() + "\n"
    shown = terminal.decode()
    assert f"creating database {database.id}" in shown
    assert f"database {database.id} ready in" in shown and database.password not in shown


def test_psql_runs_psql_with_the_uri_and_the_password_in_its_environment(fake, isolated, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Its arguments on standard output, the password it was given on standard error.
    (bin_dir / "psql").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\nprintf "%s" "$PGPASSWORD" >&2\n')
    (bin_dir / "psql").chmod(0o755)
    env = subprocess_env(fake, isolated)
    subprocess.run([*DBPROV, "new"], env=env, capture_output=True, text=True, check=True)
    database = next(iter(fake.databases.values()))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run([*DBPROV, "psql", database.id, "-c", "select 1"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Any user of the machine can read a command line, not the environment.
    assert result.stdout.splitlines() == [f"postgresql://app@localhost:{database.port}/app", "-c", "select 1"]
    assert database.password not in result.stdout
    assert result.stderr == database.password


def test_the_server_commands_come_from_entry_points():
    registered = {e.name: e for e in entry_points(group="dbprov.commands")}
    from service.cli import COMMANDS

    assert set(registered) == {command.name for command in COMMANDS}
    for command in COMMANDS:
        assert registered[command.name].load() is command
    help_text = subprocess.run(["dbprov", "--help"], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert help_text.returncode == 0, help_text.stderr
    server_part = help_text.stdout.split("Server commands:")[1]
    for command in COMMANDS:
        assert f"\n  {command.name} " in server_part
    assert "\n  new " in help_text.stdout.split("Server commands:")[0]


def test_a_broken_plugin_breaks_only_its_command(monkeypatch):
    broken = EntryPoint(name="broken", value="no_such_module:command", group="dbprov.commands")
    monkeypatch.setattr(cli_module, "entry_points", lambda group: [broken])
    runner = CliRunner()
    listed = runner.invoke(make_cli(), ["--help"])
    assert listed.exit_code == 0 and "broken" in listed.stdout and "cannot be loaded" in listed.stdout
    run = runner.invoke(make_cli(), ["broken"])
    assert run.exit_code == 1 and "no_such_module" in run.stderr


def test_the_client_distribution_is_small():
    assert sorted(r.split(">")[0].split("<")[0].split("=")[0].strip()
                  for r in requires("dbprov-client")) == ["click", "platformdirs", "requests"]
    # Its commands and plugin import nothing of the server's.
    code = (
        "import sys; import dbprov_client, dbprov_client.cli, dbprov_client.pytest_plugin;"
        "from click.testing import CliRunner;"
        "assert CliRunner().invoke(dbprov_client.cli.main, ['new', '--help']).exit_code == 0;"
        "heavy = {'flask', 'sqlalchemy', 'docker', 'psycopg', 'service', 'gunicorn'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_snapshot_clone_reset_and_templates(dbprov, fake):
    dbprov("new")
    database_id = next(iter(fake.databases))
    fake.databases[database_id].data = b"v1"
    taken = dbprov("snapshot", database_id, "--wait")
    assert taken.exit_code == 0, taken.output
    snapshot_id = taken.stdout.strip()
    assert list(fake.snapshots) == [snapshot_id] and fake.snapshots[snapshot_id].status == "ready"
    pending = dbprov("snapshot", database_id)
    assert pending.stdout.strip() in fake.snapshots
    assert fake.seen[-1].headers["Prefer"] == "respond-async"

    listing = dbprov("snapshots").stdout.splitlines()
    assert listing[0].split() == ["ID", "DATABASE", "STATUS", "VERSION", "SIZE", "AGE"]
    assert snapshot_id in listing[2] and f"{database_id}  ready" in listing[2] and "2 B" in listing[2]
    assert [s["id"] for s in json.loads(dbprov("snapshots", "--json").stdout)][1] == snapshot_id

    clone_uri = dbprov("new", "--from-snapshot", snapshot_id).stdout.strip()
    clone_id = list(fake.databases)[-1]
    assert clone_uri == fake.databases[clone_id].uri() and fake.databases[clone_id].data == b"v1"
    dbprov("new", "--from-database", database_id)
    assert fake.requests_to("POST", "/databases")[-1].body == {"from_database": database_id}
    both = dbprov("new", "--from-snapshot", snapshot_id, "--from-database", database_id)
    assert both.exit_code == 2 and "at most one" in both.stderr

    fake.databases[clone_id].data = b"changed"
    assert dbprov("reset", clone_id).stdout == f"{clone_id} ready\n"
    assert fake.databases[clone_id].data == b"v1"
    assert dbprov("reset", database_id, "--snapshot", snapshot_id).exit_code == 0
    assert fake.requests_to("POST", f"/databases/{database_id}/reset")[0].body == {"snapshot": snapshot_id}
    dbprov("new")
    refused = dbprov("reset", list(fake.databases)[-1])  # made from no snapshot
    assert refused.exit_code == EXIT_REFUSED and refused.stderr.startswith("Error: Conflict: ")
    assert dbprov("reset", "nosuch").exit_code == EXIT_NOT_FOUND

    assert dbprov("templates").stdout.split() == ["KEY", "STATUS", "VERSION", "POOL", "SNAPSHOT", "AGE"]
    from dbprov_client import Client

    Client(fake.url).template("sha256:abc", build=lambda uri: None, pool_size=1)
    rows = dbprov("templates").stdout.splitlines()
    assert rows[1].split()[:4] == ["sha256:abc", "ready", "17", "1"]
    assert json.loads(dbprov("templates", "--json").stdout)[0]["key"] == "sha256:abc"
    assert dbprov("new", "--template", "sha256:abc").exit_code == 0
    assert fake.databases[list(fake.databases)[-1]].template == "sha256:abc"
    missing = dbprov("new", "--template", "sha256:nosuch")
    assert missing.exit_code == EXIT_NOT_FOUND


def test_dump_to_a_file_or_standard_output_and_restore(dbprov, fake, tmp_path):
    dbprov("new")
    dbprov("new")
    source_id, target_id = list(fake.databases)
    fake.databases[source_id].data = b"\x00\x01 rows" * 1000
    archive = tmp_path / "app.dump"
    written = dbprov("dump", source_id, "-o", str(archive))
    assert written.exit_code == 0 and written.stdout == "" and written.stderr == ""
    assert archive.read_bytes() == b"PGDMP" + fake.databases[source_id].data
    piped = dbprov("dump", source_id)
    assert piped.exit_code == 0 and piped.stdout_bytes == archive.read_bytes()

    restored = dbprov("restore", target_id, str(archive))
    assert restored.exit_code == 0 and restored.stdout == f"{target_id} restored\n"
    assert fake.databases[target_id].data == fake.databases[source_id].data
    again = dbprov("restore", target_id, str(archive))
    assert again.exit_code == EXIT_REFUSED and "not empty" in again.stderr
    dbprov("new")
    third = list(fake.databases)[-1]
    from_stdin = CliRunner().invoke(make_cli(plugins=False), ["restore", third, "-"],
                                    input=archive.read_bytes(), env={"DBPROV_URL": fake.url})
    assert from_stdin.exit_code == 0 and fake.databases[third].data == fake.databases[source_id].data
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"not an archive")
    dbprov("new")
    assert dbprov("restore", list(fake.databases)[-1], str(bad)).exit_code == EXIT_REFUSED
    assert dbprov("restore", target_id, str(tmp_path / "none.dump")).exit_code == 2
    assert dbprov("dump", "nosuch", "-o", str(tmp_path / "x.dump")).exit_code == EXIT_NOT_FOUND
    assert not (tmp_path / "x.dump").exists()


def test_dump_refuses_a_terminal(fake, isolated):
    leader, follower = pty.openpty()
    process = subprocess.run([*DBPROV, "dump", "abc"], env=subprocess_env(fake, isolated), stdout=follower,
                             stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(follower)
    os.close(leader)
    assert process.returncode == 2 and "standard output is a terminal" in process.stderr
