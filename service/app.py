"""Application factory: wires settings, store, runtime and the domain layer into Flask."""

from __future__ import annotations

from importlib.metadata import version

from flask import Flask, Response
from flask_smorest import Api as _Api

from . import ui
from .api import data, databases, docs, health, loopback, problems, quota, tls
from .api.metrics import Metrics
from .api.schemas import ProblemSchema
from .composition import Services


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


def create_app(services: Services | None = None) -> Flask:
    """Build the API; settings are read from the environment here, never at import.

    Without ``services`` (as under ``gunicorn 'service.app:create_app()'``) the
    API runs alone: ``dbprov worker`` processes reconcile, and on PostgreSQL the
    change feed tells waiting requests when a database is ready.
    """
    services = services or Services.build()
    app = Flask("dbprov")
    app.config.update(
        API_TITLE="dbprov",
        API_VERSION=version("dbprov"),
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=docs.URL,
        OPENAPI_SWAGGER_UI_CONFIG=docs.CONFIG,
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
    api.register_blueprint(databases.databases)
    api.register_blueprint(data.data)
    api.register_blueprint(quota.quota)
    api.register_blueprint(health.health)
    api.register_blueprint(tls.tls)

    Metrics(services.store, services.settings.port_range, services.runtime.storage_report).init_app(app)
    # After the metrics' timer, so that refusals are counted; before every
    # blueprint's own checks, which run after the app's.
    loopback.init_app(app)
    ui.init_app(app)
    docs.init_app(app)

    @app.get("/openapi.yaml")
    def openapi_yaml() -> Response:
        return Response(api.spec.to_yaml(), mimetype="application/yaml")

    app.extensions["dbprov_api"] = api
    return app


def openapi_document(app: Flask) -> str:
    """The OpenAPI document the code generates, as YAML (what ``openapi.yaml`` holds)."""
    return app.extensions["dbprov_api"].spec.to_yaml()
