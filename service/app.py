"""Application factory: wires settings, store, runtime and the domain layer into Flask."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import version

from flask import Flask, Response
from flask_smorest import Api as _Api

from .api import problems, views
from .api.schemas import ProblemSchema
from .coordination import claims_for
from .crypto import Vault, load_vault
from .docker_runtime import DockerRuntime
from .metrics import Metrics
from .notify import Notifier
from .postgres import PostgresAdmin, ServerAdmin
from .provisioning import Databases
from .reconciler import Reconciler
from .runtime import ContainerRuntime
from .settings import Settings
from .store import Store
from .tenancy import Tenants


class Api(_Api):
    """flask-smorest's Api, documenting and rendering errors as RFC 9457 problems."""

    ERROR_SCHEMA = ProblemSchema

    def _register_error_handlers(self):
        problems.init_app(self._app)

    def _register_responses(self):
        # Same responses as flask-smorest's, but errors are problem+json.
        saved = self.DEFAULT_RESPONSE_CONTENT_TYPE
        self.DEFAULT_RESPONSE_CONTENT_TYPE = problems.PROBLEM_CONTENT_TYPE
        try:
            super()._register_responses()
        finally:
            self.DEFAULT_RESPONSE_CONTENT_TYPE = saved


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


def create_app(services: Services | None = None) -> Flask:
    """Build the API; settings are read from the environment here, never at import.

    Without ``services`` (as under ``gunicorn 'service.app:create_app()'``) the
    API runs alone: ``dbprov worker`` processes reconcile, and on PostgreSQL the
    change feed tells waiting requests when a database is ready.
    """
    if services is None:
        from .process import Background  # it builds on this module

        services = Services.build()
        Background(services, migrate=False, reconcile=False).start()
    app = Flask("dbprov")
    app.config.update(
        API_TITLE="dbprov",
        API_VERSION=version("dbprov"),
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/",
        # A create body is a few dozen bytes; refuse anything absurd early.
        MAX_CONTENT_LENGTH=64 * 1024,
        API_SPEC_OPTIONS={
            "security": [{"bearerAuth": []}],
            "components": {
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A token from `dbprov tokens create`: dbp_<id>.<secret>",
                    }
                }
            },
            "info": {
                "description": "PostgreSQL databases on demand: each one a dedicated server "
                "in its own Docker container, with generated credentials. Every error is an "
                "RFC 9457 application/problem+json document."
            }
        },
    )
    app.extensions["dbprov"] = services
    api = Api(app)
    api.register_blueprint(views.databases)
    api.register_blueprint(views.quota)
    api.register_blueprint(views.health)

    Metrics(services.store, services.settings.port_range).init_app(app)

    @app.get("/openapi.yaml")
    def openapi_yaml() -> Response:
        return Response(api.spec.to_yaml(), mimetype="application/yaml")

    app.extensions["dbprov_api"] = api
    return app


def openapi_document(app: Flask) -> str:
    """The OpenAPI document the code generates, as YAML (what ``openapi.yaml`` holds)."""
    return app.extensions["dbprov_api"].spec.to_yaml()
