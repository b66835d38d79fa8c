"""The composition root: builds the settings, the store, the runtime and the
domain services once per process. Nothing here starts a thread; ``process``
starts and stops the background work explicitly."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .domain.databases import Databases
from .domain.dumps import Dumps
from .domain.images import Images
from .domain.pool import WarmPool
from .domain.records import Records
from .domain.registry import Registry
from .domain.snapshots import Snapshots
from .domain.templates import Templates
from .domain.tenancy import Tenants
from .errors import SettingsError
from .postgres.admin import PostgresAdmin, ServerAdmin
from .postgres.tls import Authority
from .reconciler.loop import Reconciler
from .runtime.docker import DockerRuntime
from .runtime.protocol import ServerRuntime
from .runtime.swarm import SwarmRuntime
from .settings import Settings
from .storage.pool import Pool, open_pool
from .store.coordination import claims_for, slots_for
from .store.crypto import Vault, load_vault
from .store.engine import Store
from .store.notify import Notifier

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The process's long-lived parts, shared by the API and the reconciler."""

    settings: Settings
    store: Store
    runtime: ServerRuntime
    vault: Vault
    server_admin: ServerAdmin = field(default_factory=PostgresAdmin)
    # Off only for `dbprov serve --no-auth` on a loopback address.
    auth_required: bool = True
    # API -> reconciler: something new is wanted.
    wanted: Notifier = field(default_factory=Notifier)
    # Reconciler -> waiting requests: a record changed.
    changed: Notifier = field(default_factory=Notifier)

    def __post_init__(self) -> None:
        self.records = Records(self.store, self.wanted, self.changed)
        self.authority = Authority(self.store, self.vault, self.settings.public_host, self.settings.instance)
        self.tenants = Tenants(self.settings, self.store)
        self.images = Images(self.settings, self.runtime)
        # One set of claims for the API's warm-pool claims and the reconciler.
        self.claims = claims_for(self.store)
        self.registry = Registry(self.settings, self.store, self.records, self.vault, self.tenants)
        # Always there: templates keep warm pools of their own.
        self.pool = WarmPool(
            self.settings, self.store, self.records, self.vault, self.registry, self.images,
            self.server_admin, self.runtime, self.claims,
        )
        self.snapshots = Snapshots(self.settings, self.store, self.records, self.registry, self.runtime)
        self.templates = Templates(
            self.settings, self.store, self.records, self.registry, self.images, self.snapshots
        )
        self.databases = Databases(
            self.settings, self.store, self.records, self.vault, self.registry, self.server_admin,
            self.images, self.runtime, self.snapshots, self.templates, self.pool,
        )
        self.dumps = Dumps(
            self.registry, self.records, self.runtime, self.vault, self.server_admin,
            slots_for(self.store, self.settings.data_dir),
        )

    @classmethod
    def build(cls, settings: Settings | None = None, runtime: ServerRuntime | None = None):
        settings = settings or Settings.from_env()
        settings.ensure_data_dir()
        if runtime is None:
            runtime = _runtime(settings)
        return cls(settings, Store(settings.database_url), runtime, load_vault(settings))

    def reconciler(self, **options) -> Reconciler:
        return Reconciler(
            self.settings, self.store, self.runtime, self.records, self.vault,
            self.server_admin, self.claims, self.authority, pool=self.pool, templates=self.templates, **options,
        )


def _runtime(settings: Settings) -> ServerRuntime:
    """The engine DBPROV_RUNTIME names: one Docker engine, or a Swarm through a manager."""
    if settings.runtime == "swarm":
        return SwarmRuntime(
            instance=settings.instance,
            pull=settings.pull_images,
            exclude_label=settings.swarm_exclude_label,
            host_label=settings.swarm_host_label,
            overcommit=settings.swarm_overcommit,
            max_per_node=settings.swarm_max_per_node,
            helper_image=settings.swarm_helper_image,
            start_timeout=settings.ready_timeout,
        )
    opened = None
    if settings.storage == "btrfs":
        # Asked for by name: a pool that cannot be had stops the service now.
        opened = _pool(settings)
    return DockerRuntime(
        instance=settings.instance,
        network=settings.network,
        bind_address=settings.bind_address,
        probe_host=settings.effective_probe_host,
        pull=settings.pull_images,
        golden=settings.golden_images,
        pool=lambda: opened or _pool(settings),
    )


def _pool(settings: Settings) -> tuple[Pool | None, str]:
    """The btrfs pool DBPROV_STORAGE asks for, or None and why servers get copies."""
    if settings.storage == "copy":
        return None, "DBPROV_STORAGE=copy"
    pool, reason = open_pool(settings.storage_pool, settings.storage_pool_size, settings.storage_min_free)
    if pool is None:
        if settings.storage == "btrfs":
            raise SettingsError("DBPROV_STORAGE", f"btrfs is asked for, but there is no pool: {reason}")
        log.warning("servers' data is copied, with no thin snapshots: %s", reason)
    return pool, reason
