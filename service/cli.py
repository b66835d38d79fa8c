"""The server's commands of ``dbprov``: serve, worker, reconcile, db, openapi,
tokens, tenants, images, keys.

The ``dbprov`` command itself belongs to the client distribution (dbprov-client);
this distribution adds these commands to it through the entry-point group
``dbprov.commands`` (see pyproject.toml). ``python -m service`` runs the same
command with these commands added directly, installed entry points or not.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import click
from dbprov_client.cli import make_cli

from . import web
from .errors import DbprovError, MetadataUnavailable, SettingsError
from .settings import Settings

if TYPE_CHECKING:
    from .composition import Services

# The service's own modules (flask, sqlalchemy, the Docker SDK ...) are
# imported inside the commands that use them: importing them all costs 2-5 s,
# and `dbprov worker --check`, a container's health check with a timeout of a
# few seconds, needs none of them.

log = logging.getLogger("dbprov")
# alembic logs each plugin it sets up, at INFO, when it is imported: imported
# here after the logging is set up, it would open every command's output.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.UsageError(f"invalid setting {exc}") from None


def _services(settings: Settings | None = None) -> Services:
    from .composition import Services

    try:
        return Services.build(settings or _settings())
    except SettingsError as exc:
        raise click.UsageError(f"invalid setting {exc}") from None


def _migrated_services() -> Services:
    """Services on a metadata store at this code's schema, migrated first if it is not."""
    services = _services()
    try:
        services.store.ping()
    except MetadataUnavailable:
        # A fresh store, or one behind this code; if it is unreachable, this says so.
        _run(services.store.upgrade, services.vault)
    return services


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on")
@click.option("--port", default=8080, show_default=True, type=int, help="Port the API listens on")
@click.option("--threads", default=16, show_default=True, type=int,
              help="Concurrent requests (a create may wait for readiness)")
@click.option("--no-auth", is_flag=True,
              help="No tokens needed: every caller is an admin. Only on a loopback address.")
def serve(host: str, port: int, threads: int, no_auth: bool) -> None:
    """Serve the API with the reconciler in the same process (the embedded default).

    The metadata store is migrated on start, retrying while it is unreachable.
    """
    services = _services()
    if no_auth:
        if not _is_loopback(host):
            raise click.UsageError(f"--no-auth is only for loopback addresses, not {host}")
        services.auth_required = False
        log.warning(
            "authentication is OFF: anyone who can reach %s:%s manages every database", host, port
        )
    else:
        log.info("authentication is on: `dbprov tokens create --tenant NAME` makes a token")
    log.info("metadata store: %s", _redacted(services.store.url))
    options = web.settings(
        # gunicorn reads an IPv6 address (::1) only in brackets.
        bind=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        workers=1, threads=threads, migrate=True, reconcile=True,
        # One worker has nothing to sum, and prometheus_client is imported
        # already here (with the app), before a multiprocess folder could be set.
        multiprocess_metrics=False,
    )
    from gunicorn.app.base import BaseApplication

    from .app import create_app

    class Server(BaseApplication):
        """gunicorn with ``web.settings``, serving the API on this process's services."""

        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(services)

    Server().run()


@click.command()
@click.option("--check", is_flag=True,
              help="Exit 0 if this host's worker completed a pass recently (a health check)")
def worker(check: bool) -> None:
    """Run the reconciler as a process of its own, until SIGTERM or SIGINT.

    Several may run at once on a PostgreSQL metadata store; each database is
    worked on by one of them at a time.
    """
    settings = _settings()
    heartbeat = settings.data_dir / "worker.heartbeat"
    if check:
        limit = max(3 * settings.reconcile_interval, 30.0)
        try:
            age = time.time() - heartbeat.stat().st_mtime
        except FileNotFoundError:
            raise click.ClickException("no reconcile pass completed yet") from None
        if age > limit:
            raise click.ClickException(f"last complete reconcile pass {age:.0f} s ago")
        click.echo(f"last complete reconcile pass {age:.1f} s ago")
        return
    from .process import Background

    services = _services(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    background = Background(services, migrate=True, reconcile=True, heartbeat=heartbeat).start()
    stop.wait()
    log.info("stopping at the next step boundary")
    background.stop()


@click.command()
@click.option("--once", is_flag=True, required=True, help="Run one pass, wait for its work, and exit")
def reconcile(once: bool) -> None:
    """Make the Docker engine match the metadata store, once."""
    from .store.coordination import single_reconciler

    services = _migrated_services()
    reconciler = services.reconciler()
    try:
        with single_reconciler(services.store, services.settings.data_dir, services.runtime.publishes_here):
            reconciler.run_once(wait=True)
    except DbprovError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        reconciler.stop()


@click.group()
def db() -> None:
    """Manage the metadata store."""


@db.command()
def upgrade() -> None:
    """Apply every pending migration."""
    services = _migrated_services()
    click.echo(f"metadata store {_redacted(services.store.url)} is up to date")


@click.command()
def openapi() -> None:
    """Print the OpenAPI document (what openapi.yaml holds)."""
    from .app import create_app, openapi_document

    sys.stdout.write(openapi_document(create_app(_services())))


@click.group()
def tokens() -> None:
    """Manage API tokens (stored only as hashes)."""


@tokens.command("create")
@click.option("--tenant", required=True, help="The tenant the token acts for (created if new)")
@click.option("--admin", is_flag=True, help="The token sees and manages every tenant")
def tokens_create(tenant: str, admin: bool) -> None:
    """Create a token and print it: it cannot be shown again."""
    services = _migrated_services()
    token, plaintext = _run(services.tenants.create_token, tenant, admin)
    click.echo(plaintext)
    click.echo(f"token {token.id} for tenant {tenant}{' (admin)' if admin else ''}; "
               "keep it now, it is not stored", err=True)


@tokens.command("list")
def tokens_list() -> None:
    """List tokens: id, tenant, admin, created, revoked (never the token itself)."""
    for token in _run(_migrated_services().tenants.list_tokens):
        revoked = token.revoked_at.isoformat(timespec="seconds") if token.revoked_at else "-"
        click.echo(
            f"{token.id}  {token.tenant:<20} {'admin' if token.admin else '-':<6} "
            f"{token.created_at.isoformat(timespec='seconds')}  revoked: {revoked}"
        )


@tokens.command("revoke")
@click.argument("token_id")
def tokens_revoke(token_id: str) -> None:
    """Revoke a token by its id; it stops working at once."""
    _run(_migrated_services().tenants.revoke_token, token_id)
    click.echo(f"token {token_id} revoked")


@click.group()
def tenants() -> None:
    """Manage tenants."""


@tenants.command("quota")
@click.argument("tenant")
@click.option("--limit", type=click.IntRange(min=0), help="Live databases allowed")
@click.option("--default", "use_default", is_flag=True, help="Back to DBPROV_TENANT_QUOTA")
def tenants_quota(tenant: str, limit: int | None, use_default: bool) -> None:
    """Show a tenant's quota, or set it with --limit or --default."""
    services = _migrated_services()
    if limit is not None or use_default:
        _run(services.tenants.set_limit, tenant, None if use_default else limit)
    used, current = _run(services.tenants.quota, tenant)
    click.echo(f"{tenant}: {used} of {current} databases")


@tenants.command("plans")
@click.argument("tenant")
@click.option("--allow", help="Comma-separated plans the tenant may use")
@click.option("--all", "every", is_flag=True, help="Lift the restriction: every plan")
def tenants_plans(tenant: str, allow: str | None, every: bool) -> None:
    """Show the plans a tenant may use, or set them with --allow or --all."""
    services = _migrated_services()
    if allow is not None or every:
        names = None if every else [name.strip() for name in allow.split(",") if name.strip()]
        _run(services.tenants.set_plans, tenant, names)
    plans = _run(services.tenants.plans, tenant)
    click.echo(f"{tenant}: {', '.join(plans) if plans is not None else 'every plan'}")


@click.group(invoke_without_command=True)
@click.pass_context
def images(context: click.Context) -> None:
    """Show each configured version's image: available, pulling or missing."""
    if context.invoked_subcommand is not None:
        return
    services = _services()
    for version, state in _run(services.images.check, False).items():
        click.echo(f"{version}  {services.settings.images[version]}  {state}")


@images.command("prune")
def images_prune() -> None:
    """Remove the golden copies (images, volumes and a pool's golden
    subvolumes) that no server on the engine stands on: every installation on
    it shares them, and the next server makes them again (a few seconds,
    once). On a btrfs pool, also data no volume has bound for 10 minutes."""
    for name in _run(_services().runtime.prune_caches):
        click.echo(f"removed {name}")


@images.command("pull")
def images_pull() -> None:
    """Pull every configured version's image, showing the engine's progress.

    Exits non-zero if any image could not be pulled.
    """
    services = _services()
    failed = []
    for version, image in services.settings.images.items():
        click.echo(f"pulling {image} (version {version})", err=True)
        try:
            services.runtime.pull_image(image, lambda line: click.echo(f"  {line}", err=True))
        except DbprovError as exc:
            if not _run(services.runtime.has_image, image):
                click.echo(f"  failed: {exc.detail}", err=True)
                failed.append(image)
                continue
            # No newer image to be had, but the engine's own copy serves.
            click.echo(f"  not pulled ({exc.detail}); the engine's copy stays", err=True)
        click.echo(f"{version}  {image}  available")
    if failed:
        raise click.ClickException(f"could not pull {', '.join(failed)}")


@click.group()
def keys() -> None:
    """Manage the keys that encrypt stored passwords."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new key for DBPROV_SECRET_KEY."""
    from .store.crypto import generate_key

    click.echo(generate_key())


@keys.command("rotate")
def keys_rotate() -> None:
    """Re-encrypt every stored secret with the first key of DBPROV_SECRET_KEY.

    Put the new key first, keep the old ones after it, run this, then drop them.
    """
    from .store.rekey import reencrypt_authority, reencrypt_secrets

    services = _migrated_services()
    databases, snapshots = _run(reencrypt_secrets, services.store, services.vault)
    authority = " and the key of the servers' CA" if _run(reencrypt_authority, services.store, services.vault) else ""
    click.echo(
        f"re-encrypted the secrets of {databases} databases and {snapshots} snapshots{authority} with the first key"
    )


#: Every top-level server command; pyproject.toml registers each as an entry point.
COMMANDS = (serve, worker, reconcile, db, openapi, tokens, tenants, images, keys)


def main() -> None:
    """``dbprov`` with the client's commands and these (``python -m service``)."""
    make_cli(COMMANDS)(prog_name="dbprov")


def _run(function, *args):
    try:
        return function(*args)
    except DbprovError as exc:
        raise click.ClickException(exc.detail) from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
