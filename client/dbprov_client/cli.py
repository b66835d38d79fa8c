"""The ``dbprov`` command: the client commands, plus whatever commands installed
distributions register in the entry-point group ``dbprov.commands`` (the server
registers ``serve``, ``worker``, ``tokens`` ...), as ``flask`` does with
``flask.commands``.

Exit statuses of the client commands:

    0  done
    1  any other error (psql missing, ...)
    2  wrong usage (a bad option or argument)
    3  not found: no such database (404)
    4  refused: the server refused the request (any other 4xx)
    5  unavailable: the server failed (5xx), could not be reached, or a wait ran out
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from importlib.metadata import EntryPoint, entry_points
from urllib.parse import urlsplit, urlunsplit

import click

from . import config
from .client import Client
from .durations import human, parse_duration
from .errors import NotFound, ProblemError, Refused, Unavailable
from .models import Database

ENTRY_POINT_GROUP = "dbprov.commands"

EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_UNAVAILABLE = 5

STATUSES = ["pending", "provisioning", "ready", "failed", "stopping", "stopped", "starting",
            "resetting", "sleeping", "waking", "lost", "deleting", "deleted", "unavailable"]


def exit_code(problem: ProblemError) -> int:
    if isinstance(problem, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(problem, Refused):
        return EXIT_REFUSED
    if isinstance(problem, Unavailable):
        return EXIT_UNAVAILABLE
    return 1


class _Failure(click.ClickException):
    """A problem as one line on standard error, ``Error: <title>: <detail>``."""

    def __init__(self, problem: ProblemError) -> None:
        super().__init__(problem.one_line())
        self.exit_code = exit_code(problem)


def _handled(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ProblemError as exc:
            raise _Failure(exc) from None

    return wrapper


class _Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _Duration()


class _DurationOrNever(_Duration):
    name = "duration|never"

    def convert(self, value, param, ctx):
        return value if value == "never" else super().convert(value, param, ctx)


def _client() -> Client:
    return Client()


# -- the group --------------------------------------------------------------------


class DbprovGroup(click.Group):
    """Its own commands, then those of the ``dbprov.commands`` entry points,
    each loaded only when it is run or listed."""

    def __init__(self, *args, plugins: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.load_plugins = plugins
        self._plugins: dict[str, EntryPoint] | None = None

    def plugins(self) -> dict[str, EntryPoint]:
        if self._plugins is None:
            found: dict[str, EntryPoint] = {}
            if self.load_plugins:
                for entry in entry_points(group=ENTRY_POINT_GROUP):
                    found.setdefault(entry.name, entry)
            self._plugins = found
        return self._plugins

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self.plugins()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = self.commands.get(name)
        if command is None and name in self.plugins():
            entry = self.plugins()[name]
            try:
                command = entry.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the rest
                command = _broken(name, entry, exc)
            self.add_command(command, name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Commands": [], "Server commands": []}
        names = [n for n in self.list_commands(ctx) if not getattr(self.get_command(ctx, n), "hidden", True)]
        limit = formatter.width - 6 - max((len(n) for n in names), default=0)
        for name in names:
            command = self.get_command(ctx, name)
            section = "Commands" if name in CLIENT_COMMANDS else "Server commands"
            sections[section].append((name, command.get_short_help_str(limit)))
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _broken(name: str, entry: EntryPoint, exc: Exception) -> click.Command:
    message = f"the command {name!r} ({entry.value}) cannot be loaded: {type(exc).__name__}: {exc}"

    @click.command(name, help=f"(cannot be loaded: {exc})",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command() -> None:
        raise click.ClickException(message)

    return command


def make_cli(commands=(), *, plugins: bool = True) -> DbprovGroup:
    """The ``dbprov`` group: the client's commands, ``commands``, and (with
    ``plugins``) those of the ``dbprov.commands`` entry points."""

    @click.group(cls=DbprovGroup, plugins=plugins, epilog=(
        "The client commands reach the server at DBPROV_URL (default http://127.0.0.1:8080, "
        "or what `dbprov login` stored) with DBPROV_TOKEN. Their exit statuses: 3 not found, "
        "4 refused, 5 server unavailable (2: wrong usage, 1: anything else)."))
    @click.option("--log-level", default="INFO", show_default=True, envvar="DBPROV_LOG_LEVEL")
    @click.version_option(package_name="dbprov-client", prog_name="dbprov")
    def cli(log_level: str) -> None:
        """dbprov: PostgreSQL databases on demand."""
        logging.basicConfig(
            level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )

    for command in (*_CLIENT, *commands):
        cli.add_command(command)
    return cli


# -- output ----------------------------------------------------------------------


def _dump(value) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _age(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return human((datetime.now(timezone.utc) - moment).total_seconds())


def _expiry(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    left = (moment - datetime.now(timezone.utc)).total_seconds()
    return f"in {human(left)}" if left > 0 else "due"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


class _Progress:
    """One updating line on standard error while a create waits, only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.text = "creating a database"
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="dbprov-progress", daemon=True)
            self._thread.start()
        return self

    def accepted(self, database: Database) -> None:
        self.text = f"creating database {database.id} (postgres {database.version}): {database.status}"

    def _run(self) -> None:
        frames = "|/-\\"
        tick = 0
        while not self._stop.wait(0.1):
            elapsed = time.monotonic() - self.started
            sys.stderr.write(f"\r\x1b[2K{frames[tick % 4]} {self.text} {elapsed:.0f}s")
            sys.stderr.flush()
            tick += 1

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()

    def done(self, database: Database) -> None:
        if self.enabled:
            click.echo(
                f"database {database.id} {database.status} in {time.monotonic() - self.started:.1f} s "
                f"(postgres {database.version}, port {database.port}, expires {_expiry(database.expires_at)}); "
                f"`dbprov rm {database.id}` deletes it", err=True,
            )


# -- the client commands ----------------------------------------------------------------

_ID = click.argument("database_id", metavar="ID")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the whole record as JSON")


@click.command()
@click.option("--version", "version", metavar="V", help="PostgreSQL major version (default: the server's)")
@click.option("--name", metavar="N", help="A label, unique among your live databases")
@click.option("--ttl", type=DURATION, metavar="DURATION",
              help="Deleted by the server this long from now unless renewed: 600, 90s, 30m, 2h, 1d")
@click.option("--plan", metavar="P", help="A plan of the server (memory, CPUs)")
@click.option("--idle-stop", type=_DurationOrNever(), metavar="DURATION|never",
              help="Sleep after this long without clients (the next connection wakes it); "
                   "default: the plan's or the server's")
@click.option("--durable/--not-durable", default=True, show_default=True,
              help="--not-durable: its server does not sync writes to disk (faster; for data "
                   "that a crash of the machine may lose, such as a test suite's)")
@click.option("--from-snapshot", metavar="S", help="A clone of this snapshot's data")
@click.option("--from-database", metavar="D", help="A clone of this database's data (snapshotted first)")
@click.option("--template", metavar="KEY", help="A clone of this ready template")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until it accepts connections; --no-wait prints the URI at once")
@click.option("--timeout", type=DURATION, default="10m", show_default=True, help="Longest wait")
@_JSON
@_handled
def new(version, name, ttl, plan, idle_stop, durable, from_snapshot, from_database, template, wait,
        timeout, as_json) -> None:
    """Create a database and print its connection URI.

    The URI is the last line of standard output:

        psql "$(dbprov new --wait)"

    With --from-snapshot, --from-database or --template (one of them) it is a
    clone, a dedicated server that starts with that data.

    While it waits, a progress line goes to standard error if that is a terminal.
    """
    if sum(source is not None for source in (from_snapshot, from_database, template)) > 1:
        raise click.UsageError("give at most one of --from-snapshot, --from-database and --template")
    client = _client()
    asked = {} if idle_stop is None else {"idle_stop": None if idle_stop == "never" else idle_stop}
    with _Progress(enabled=sys.stderr.isatty()) as progress:
        database = client.create(
            version=version, name=name, ttl=ttl, plan=plan, durable=durable, wait=wait, timeout=timeout,
            **asked,
            from_snapshot=from_snapshot, from_database=from_database, template=template,
            on_accepted=progress.accepted if (wait and progress.enabled) else None,
        )
    progress.done(database)
    if as_json:
        _dump(database.raw)
    else:
        click.echo(database.connection_uri)


@click.command("ls")
@click.option("--status", type=click.Choice(STATUSES), help="Only databases in this status")
@click.option("--all", "-a", "show_all", is_flag=True, help="Deleted ones too")
@_JSON
@_handled
def ls(status, show_all, as_json) -> None:
    """List your databases, newest first.

    Deleted ones are left out unless --all (or --status) asks for them.
    """
    items = [d for d in _client().list_all(status) if show_all or status or d.status != "deleted"]
    if as_json:
        _dump([d.raw for d in items])
        return
    _table(
        ["ID", "NAME", "STATUS", "VERSION", "PORT", "AGE", "EXPIRES"],
        [[d.id, d.name or "-", d.status, d.version or "-", str(d.port or "-"), _age(d.created_at),
          _expiry(d.expires_at) if d.status != "deleted" else "-"] for d in items],
    )


@click.command()
@_ID
@_JSON
@_handled
def show(database_id, as_json) -> None:
    """Show one database (without its password)."""
    database = _client().get(database_id)
    if as_json:
        _dump(database.raw)
        return
    rows = [
        ("id", database.id), ("name", database.name or "-"), ("status", database.status),
        ("version", database.version), ("image", database.image), ("plan", database.plan),
        ("host", database.host), ("port", database.port or "-"), ("database", database.database),
        ("username", database.username), ("protected", "yes" if database.protected else "no"),
        ("durable", "yes" if database.durable else "no: a crash of the machine may lose its data"),
        ("idle stop", f"{database.idle_stop:g} s" if database.idle_stop is not None else "never"),
        ("expires", f"{database.expires_at.isoformat()} ({_expiry(database.expires_at)})"
                    if database.expires_at else "never"),
        ("created", f"{database.created_at.isoformat() if database.created_at else '-'} "
                    f"({_age(database.created_at)} ago)"),
    ]
    if database.last_error:
        rows.append(("last error", database.last_error))
    for key, value in rows:
        click.echo(f"{key + ':':<11} {value}")


@click.command()
@_ID
@_handled
def url(database_id) -> None:
    """Print a database's connection URI (with its password)."""
    credentials = _client().credentials(database_id)
    if not credentials.connection_uri:
        raise Refused(409, "Conflict", f"database {database_id} holds no port now")
    click.echo(credentials.connection_uri)


@click.command()
@click.argument("database_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--wait", is_flag=True, help="Wait until container, volume and port are gone")
@click.option("--timeout", type=DURATION, default="2m", show_default=True, help="Longest wait")
@_handled
def rm(database_ids, wait, timeout) -> None:
    """Delete databases (repeating it is harmless)."""
    client = _client()
    for database_id in database_ids:
        database = client.delete(database_id, wait=wait, timeout=timeout)
        click.echo(f"{database.id} {database.status}")


def _without_password(uri: str) -> str:
    parts = urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=userinfo.partition(":")[0] + at + host))


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_ID
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
@_handled
def psql(database_id, psql_args) -> None:
    """Run psql on a database; arguments after the ID go to psql."""
    credentials = _client().credentials(database_id)
    if not credentials.connection_uri:
        raise Refused(409, "Conflict", f"database {database_id} holds no port now")
    sys.stdout.flush()
    # In the environment, which only the user and root can read, not in the
    # command line, which `ps` shows every user of the machine.
    environment = {**os.environ, "PGPASSWORD": credentials.password}
    try:
        os.execvpe("psql", ["psql", _without_password(credentials.connection_uri), *psql_args], environment)
    except FileNotFoundError:
        raise click.ClickException("psql is not installed (or not on PATH)") from None


@click.command()
@_ID
@click.option("--wait", is_flag=True, help="Wait until it is stopped")
@_handled
def stop(database_id, wait) -> None:
    """Stop a database's server.

    Its data, port and password stay; its memory is freed.
    """
    database = _client().stop(database_id, wait=wait)
    click.echo(f"{database.id} {database.status}")


@click.command()
@_ID
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it is ready")
@_handled
def start(database_id, wait) -> None:
    """Start a stopped database."""
    database = _client().start(database_id, wait=wait)
    click.echo(f"{database.id} {database.status}")


@click.command()
@_ID
@click.option("--ttl", type=DURATION, required=True, metavar="DURATION",
              help="The new lease, from now: 600, 90s, 30m, 2h, 1d")
@_handled
def renew(database_id, ttl) -> None:
    """Renew a database's expiry lease.

    It is deleted TTL from now unless renewed again.
    """
    database = _client().renew(database_id, ttl)
    expires = database.expires_at.isoformat() if database.expires_at else "never"
    click.echo(f"{database.id} expires {expires}")


@click.command()
@_ID
@_handled
def rotate(database_id) -> None:
    """Give a database a new password and print the new URI.

    The old password stops working at once.
    """
    click.echo(_client().rotate(database_id).connection_uri)


@click.command()
@_ID
@click.option("--limit", type=click.IntRange(1, 1000), help="At most this many")
@_JSON
@_handled
def events(database_id, limit, as_json) -> None:
    """What happened to a database, oldest first."""
    items = _client().events(database_id, limit=limit)
    if as_json:
        _dump([{**vars(e), "at": e.at.isoformat()} for e in items])
        return
    for event in items:
        details = f"  {json.dumps(event.details, default=str)}" if event.details else ""
        click.echo(f"{event.at.isoformat(timespec='seconds')}  {event.kind:<20} {event.actor}{details}")


@click.command()
@_ID
@click.option("--tail", type=click.IntRange(1, 10000), help="Lines from the end (server default: 100)")
@_handled
def logs(database_id, tail) -> None:
    """The last lines of a database server's log."""
    click.echo(_client().logs(database_id, tail), nl=False)


@click.command()
@click.option("--url", "server", metavar="URL", help=f"The server (default: DBPROV_URL, or {config.DEFAULT_URL})")
@click.option("--token", metavar="TOKEN", help="The token (default: DBPROV_TOKEN, or asked for)")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check the token with the server before storing it")
@_handled
def login(server, token, check) -> None:
    """Store a server URL and token for the client commands.

    The file (in the user's config folder) has mode 0600.

    DBPROV_URL and DBPROV_TOKEN still win over what is stored, and the stored
    token is sent only to the stored URL.
    """
    server = (server or os.environ.get("DBPROV_URL") or config.load().get("url")
              or config.DEFAULT_URL).rstrip("/")
    if token is None:
        token = os.environ.get("DBPROV_TOKEN") or click.prompt(
            "Token (empty for a server without authentication)", default="",
            show_default=False, hide_input=True, err=True,
        )
    tenant = ""
    if check:
        tenant = f" as tenant {Client(server, token or '').quota().tenant}"
    path = config.save(server, token or None)
    click.echo(f"logged in to {server}{tenant}; stored in {path}", err=True)


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # pragma: no cover


@click.command()
@_ID
@click.option("--wait", is_flag=True, help="Wait until the snapshot is ready")
@click.option("--timeout", type=DURATION, default="10m", show_default=True, help="Longest wait")
@_JSON
@_handled
def snapshot(database_id, wait, timeout, as_json) -> None:
    """Take a consistent snapshot of a database and print its id.

    The database's server stops cleanly for a second or two (connections are
    refused meanwhile). Without --wait the id is printed at once, while the
    snapshot is still pending.
    """
    taken = _client().snapshot(database_id, wait=wait, timeout=timeout)
    if as_json:
        _dump(taken.raw)
    else:
        click.echo(taken.id)


@click.command()
@_JSON
@_handled
def snapshots(as_json) -> None:
    """List your snapshots, newest first."""
    items = _client().snapshots()
    if as_json:
        _dump([s.raw for s in items])
        return
    _table(
        ["ID", "DATABASE", "STATUS", "VERSION", "SIZE", "AGE"],
        [[s.id, s.database_id, s.status, s.version or "-", _size(s.size_bytes), _age(s.created_at)]
         for s in items],
    )


@click.command()
@_ID
@click.option("--snapshot", "snapshot_id", metavar="S",
              help="The snapshot to go back to (default: the one it was made from)")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it is ready again")
@click.option("--timeout", type=DURATION, default="10m", show_default=True, help="Longest wait")
@_handled
def reset(database_id, snapshot_id, wait, timeout) -> None:
    """Put a database back to a snapshot, keeping its URI and password.

    Its connections are dropped.
    """
    database = _client().reset(database_id, snapshot_id, wait=wait, timeout=timeout)
    click.echo(f"{database.id} {database.status}")


@click.command()
@_ID
@click.option("--output", "-o", metavar="FILE", type=click.Path(dir_okay=False, writable=True),
              help="Write the archive here (default: standard output, unless it is a terminal)")
@_handled
def dump(database_id, output) -> None:
    """Stream a pg_dump archive (custom format) of a database.

    To FILE (written whole or not at all) or to standard output:

        dbprov dump ID -o app.dump;  dbprov dump ID | pg_restore -l
    """
    client = _client()
    if output and output != "-":
        written = client.dump(database_id, output)
        if sys.stderr.isatty():
            click.echo(f"{_size(written)} written to {output}", err=True)
        return
    stdout = sys.stdout.buffer
    if stdout.isatty():
        raise click.UsageError("standard output is a terminal: give -o FILE (or pipe it)")
    client.dump(database_id, stdout)
    stdout.flush()


@click.command()
@_ID
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True))
@_handled
def restore(database_id, file) -> None:
    """Restore a pg_dump archive (custom format) into an empty database.

    FILE is streamed (- for standard input). It is restored in one
    transaction: a bad archive changes nothing.
    """
    client = _client()
    if file == "-":
        database = client.restore(database_id, sys.stdin.buffer)
    else:
        try:
            source = open(file, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise click.BadParameter(f"{file}: {exc.strerror}", param_hint="FILE") from None
        with source:
            database = client.restore(database_id, source)
    click.echo(f"{database.id} restored")


@click.command()
@_JSON
@_handled
def templates(as_json) -> None:
    """List your templates."""
    items = _client().templates()
    if as_json:
        _dump([t.raw for t in items])
        return
    _table(
        ["KEY", "STATUS", "VERSION", "POOL", "SNAPSHOT", "AGE"],
        [[t.key, t.status, t.version or "-", str(t.pool_size), t.snapshot_id or "-", _age(t.created_at)]
         for t in items],
    )


@click.command()
@_handled
def ca() -> None:
    """Print the certificate of the CA that signs the database servers'.

    With it, sslmode=verify-full makes sure a client reaches the server dbprov
    made: `dbprov ca > ~/.postgresql/root.crt`, or sslrootcert=FILE.
    """
    click.echo(_client().ca(), nl=False)


@click.command()
@_JSON
@_handled
def storage(as_json) -> None:
    """Say what the service keeps data on, and why.

    btrfs: snapshots of running servers and clones in constant time, no disk
    until written; copy: file by file, the server stopped for a snapshot.
    Why, and the pool's room, are shown to admins.
    """
    found = _client().readyz().storage
    if as_json:
        _dump(found)
        return
    click.echo(found.get("backend", "unknown"))
    if found.get("reason"):
        click.echo(f"why: {found['reason']}")
    if found.get("free_bytes") is not None:
        click.echo(f"free: {_size(found['free_bytes'])} of {_size(found.get('size_bytes'))} in {found['pool']}")


_CLIENT = (new, ls, show, url, rm, psql, stop, start, renew, rotate, events, logs, snapshot, snapshots,
           reset, dump, restore, templates, ca, storage, login)
CLIENT_COMMANDS = frozenset(command.name for command in _CLIENT)

#: The ``dbprov`` console script.
main = make_cli()

__all__ = ["CLIENT_COMMANDS", "DbprovGroup", "exit_code", "main", "make_cli"]
