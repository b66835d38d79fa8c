"""The ``dbprov`` command."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import click
from gunicorn.app.base import BaseApplication
from sqlalchemy.engine import make_url

from .app import Services, create_app, openapi_document
from .coordination import single_reconciler
from .errors import DbprovError, SettingsError
from .process import Background
from .reconciler import Reconciler

log = logging.getLogger("dbprov")


def _services() -> Services:
    try:
        return Services.build()
    except SettingsError as exc:
        raise click.UsageError(f"invalid setting {exc}") from None


@click.group()
@click.option("--log-level", default="INFO", show_default=True, envvar="DBPROV_LOG_LEVEL")
def main(log_level: str) -> None:
    """dbprov: PostgreSQL databases on demand."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on")
@click.option("--port", default=8080, show_default=True, type=int, help="Port the API listens on")
@click.option("--threads", default=16, show_default=True, type=int,
              help="Concurrent requests (a create may wait for readiness)")
def serve(host: str, port: int, threads: int) -> None:
    """Serve the API with the reconciler in the same process (the embedded default).

    The metadata store is migrated on start, retrying while it is unreachable.
    """
    services = _services()
    log.info("metadata store: %s", _redacted(services.store.url))
    _Server(
        {
            "bind": f"{host}:{port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": 120,
            "graceful_timeout": 30,
            "accesslog": "-",
            # One per process otherwise, all at the same path in the home folder.
            "control_socket_disable": True,
        },
        services,
    ).run()


class _Server(BaseApplication):
    """gunicorn with one worker that runs the API and the reconciler side by side."""

    def __init__(self, options: dict, services: Services) -> None:
        self.options = options
        self.services = services
        self.background: Background | None = None
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        self.cfg.set("worker_exit", self._worker_exit)

    def load(self):
        # Runs in the worker after the fork: threads started here live there.
        self.background = Background(self.services, migrate=True, reconcile=True).start()
        return create_app(self.services)

    def _worker_exit(self, _server, _worker) -> None:
        if self.background is not None:
            self.background.stop()


@main.command()
@click.option("--check", is_flag=True,
              help="Exit 0 if this host's worker completed a pass recently (a health check)")
def worker(check: bool) -> None:
    """Run the reconciler as a process of its own, until SIGTERM or SIGINT.

    Several may run at once on a PostgreSQL metadata store; each database is
    worked on by one of them at a time.
    """
    services = _services()
    heartbeat = services.settings.data_dir / "worker.heartbeat"
    if check:
        limit = max(3 * services.settings.reconcile_interval, 30.0)
        try:
            age = time.time() - heartbeat.stat().st_mtime
        except FileNotFoundError:
            raise click.ClickException("no reconcile pass completed yet") from None
        if age > limit:
            raise click.ClickException(f"last complete reconcile pass {age:.0f} s ago")
        click.echo(f"last complete reconcile pass {age:.1f} s ago")
        return
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    background = Background(services, migrate=True, reconcile=True, heartbeat=heartbeat).start()
    stop.wait()
    log.info("stopping at the next step boundary")
    background.stop()


@main.command()
@click.option("--once", is_flag=True, required=True, help="Run one pass, wait for its work, and exit")
def reconcile(once: bool) -> None:
    """Make the Docker engine match the metadata store, once."""
    services = _services()
    reconciler = Reconciler(
        services.settings, services.store, services.runtime, services.wanted, services.changed
    )
    try:
        with single_reconciler(services.store, services.settings.data_dir):
            reconciler.run_once(wait=True)
    except DbprovError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        reconciler.stop()


@main.group()
def db() -> None:
    """Manage the metadata store."""


@db.command()
def upgrade() -> None:
    """Apply every pending migration."""
    services = _services()
    try:
        services.store.upgrade()
    except DbprovError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"metadata store {_redacted(services.store.url)} is up to date")


@main.command()
def openapi() -> None:
    """Print the OpenAPI document (what openapi.yaml holds)."""
    sys.stdout.write(openapi_document(create_app(_services())))


def _redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
