"""The composition root: builds the settings, the store, the runtime and the
domain services once per process. Nothing here starts a thread; ``process``
starts and stops the background work explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

from .coordination import claims_for
from .crypto import Vault, load_vault
from .docker_runtime import DockerRuntime
from .notify import Notifier
from .postgres import PostgresAdmin, ServerAdmin
from .provisioning import Databases
from .reconciler import Reconciler
from .runtime import ContainerRuntime
from .settings import Settings
from .store import Store
from .tenancy import Tenants


@dataclass
class Services:
    """The process's long-lived parts, shared by the API and the reconciler."""

    settings: Settings
    store: Store
    runtime: ContainerRuntime
    vault: Vault
    server_admin: ServerAdmin = field(default_factory=PostgresAdmin)
    # Off only for `dbprov serve --no-auth` on a loopback address.
    auth_required: bool = True
    # API -> reconciler: something new is wanted.
    wanted: Notifier = field(default_factory=Notifier)
    # Reconciler -> waiting requests: a record changed.
    changed: Notifier = field(default_factory=Notifier)

    def __post_init__(self) -> None:
        self.tenants = Tenants(self.settings, self.store)
        # One set of claims for the API's warm-pool claims and the reconciler.
        self.claims = claims_for(self.store)
        self.databases = Databases(
            self.settings, self.store, self.vault, self.tenants, self.server_admin,
            self.claims, self.wanted, self.changed,
        )

    @classmethod
    def build(cls, settings: Settings | None = None, runtime: ContainerRuntime | None = None):
        settings = settings or Settings.from_env()
        settings.ensure_data_dir()
        return cls(settings, Store(settings.database_url), runtime or DockerRuntime(), load_vault(settings))

    def reconciler(self, **options) -> Reconciler:
        return Reconciler(
            self.settings, self.store, self.runtime, self.wanted, self.changed,
            vault=self.vault, server_admin=self.server_admin, claims=self.claims,
            pool=self.databases.stock_pool if self.settings.pool_sizes else None, **options,
        )
