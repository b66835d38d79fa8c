"""Liveness and readiness: what a load balancer or an orchestrator asks, without a token."""

from __future__ import annotations

import dataclasses

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint

from ..errors import DbprovError
from .common import current_services
from .problems import problem_response
from .schemas import HealthSchema

health = Blueprint("health", __name__, description="Liveness and readiness of the service")


@health.route("/healthz")
class Liveness(MethodView):
    @health.doc(security=[])
    @health.response(200, HealthSchema)
    def get(self):
        """The process answers"""
        return {"status": "ok"}


@health.route("/readyz")
class Readiness(MethodView):
    # A token is not needed; an admin's shows why a check fails.
    @health.doc(security=[{}, {"bearerAuth": []}])
    @health.response(200, HealthSchema)
    @health.alt_response(503, response="SERVICE_UNAVAILABLE", description="Names what is unreachable")
    def get(self):
        """The metadata store and the Docker engine are both reachable; each version's image; the storage backend"""
        services = current_services()
        checks = {}
        for name, ping in (("metadata", services.store.ping), ("docker", services.runtime.ping)):
            try:
                ping()
                checks[name] = "ok"
            except DbprovError as exc:
                checks[name] = exc.detail
        # The engine's and the store's own words name hosts, users, paths and
        # registries: for admins only. Others learn what fails, not why.
        details = _sees_readiness_details(services, checks["metadata"] == "ok")
        failing = [name for name, result in checks.items() if result != "ok"]
        if not details:
            checks = {name: "unavailable" if name in failing else "ok" for name in checks}
        if failing:
            return problem_response(
                503,
                "Not ready",
                f"unreachable: {', '.join(failing)}",
                slug="not-ready",
                headers={"Retry-After": "5"},
                checks=checks,
            )
        images = services.images.check()
        if not details:
            images = {version: state.partition(":")[0] for version, state in images.items()}
        # A missing image takes only its version out of service, not the API:
        # "degraded" says so without failing a load balancer's check.
        status = "ok" if all(state == "available" for state in images.values()) else "degraded"
        report = services.runtime.storage_report()
        storage = {"backend": report.backend}
        if details:
            storage.update(
                (name, value) for name, value in dataclasses.asdict(report).items() if value is not None
            )
        return {"status": status, "checks": checks, "images": images, "storage": storage}


def _sees_readiness_details(services, store_up: bool) -> bool:
    """Whether the caller is an admin: with --no-auth everyone is; otherwise a
    caller whose admin token the store can check (no token is asked for)."""
    if not services.auth_required:
        return True
    if not store_up or not request.headers.get("Authorization"):
        return False
    try:
        return services.tenants.authenticate(request.headers["Authorization"]).admin
    except DbprovError:
        return False
