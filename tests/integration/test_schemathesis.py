"""Property-based requests, generated from openapi.yaml, against the live API with auth.

Bounded: a fixed number of examples per operation, no stateful runs. No
response may be a 5xx, and every response must match the document.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.domain.parameters import check_values
from service.domain.requests import DATABASE_PARAMETERS
from service.errors import ValidationError
from service.postgres.admin import TRUSTED_EXTENSIONS

from .conftest import ServiceProcess

# Alone: xdist's grouping schedulers run one of the tests schemathesis generates, not all.
pytestmark = [pytest.mark.docker, pytest.mark.alone]

# What the live service runs (ServiceProcess's DBPROV_IMAGES).
SUPPORTED = ("15", "17")
schema = schemathesis.openapi.from_path(Path(__file__).parents[2] / "openapi.yaml")


@pytest.fixture(scope="module")
def live(docker_client, tmp_path_factory):
    service = ServiceProcess(tmp_path_factory.mktemp("schemathesis"))
    service.start([sys.executable, "-m", "service", "serve", "--port", str(service.port)])
    service.token = service.create_token("fuzz", admin=True)
    yield service
    service.delete_all()
    service.stop()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_document(case, live):
    refused = refused_by_rule(case)
    # respond-async: created databases are started in the background while
    # the examples go on; the fixture deletes them all afterwards.
    response = case.call(
        base_url=live.url,
        headers={"Authorization": f"Bearer {live.token}", "Prefer": "respond-async"},
    )
    if response.status_code == 414:
        # gunicorn's own limit on the request line (4094 bytes), answered
        # before the application sees the request; the README lists it.
        assert len(response.request.url) > 4000
        return
    # A template key that an earlier example is building answers 423, as documented.
    building = case.method == "POST" and case.operation.path == "/templates"
    case.validate_response(
        response, excluded_checks=[positive_data_acceptance] if refused or building else []
    )
    if refused:
        assert 400 <= response.status_code < 500, response.text


def refused_by_rule(case) -> bool:
    """A body the document allows but a rule refuses with a documented 4xx.

    Which versions run, which plans and extensions are offered, is the
    service's setting (DBPROV_IMAGES, DBPROV_PLANS, DBPROV_ALLOWED_EXTENSIONS);
    which settings a create may give, and their values, the server's; an
    expiry must be in the future and given one way; a cursor must be one the
    service gave out. These are checked here instead of by "valid data
    must be accepted".
    """
    body = case.body if isinstance(case.body, dict) else {}
    if case.method == "GET" and case.operation.path == "/databases" and "cursor" in (case.query or {}):
        return True  # only a cursor the service gave out is one (documented 422)
    if case.method == "POST" and case.operation.path == "/databases":
        version = body.get("version")
        if isinstance(version, str) and version not in SUPPORTED:
            return True
        if body.get("plan", "default") != "default":
            return True
        extensions = body.get("extensions")
        if isinstance(extensions, list) and any(isinstance(e, str) and e not in TRUSTED_EXTENSIONS for e in extensions):
            return True
        parameters = body.get("parameters")
        if isinstance(parameters, dict) and parameters:
            # Only the database-level settings offered, each with a value the
            # server takes (documented: any other is refused with 422 naming it).
            if not all(isinstance(name, str) and name in DATABASE_PARAMETERS for name in parameters):
                return True
            try:
                check_values(version if isinstance(version, str) else "17", parameters)
            except ValidationError:
                return True
    elif not (case.method == "PATCH" and case.operation.path == "/databases/{database_id}"):
        return False
    if "ttl" in body and "expires_at" in body:
        return True
    expires_at = body.get("expires_at")
    if isinstance(expires_at, str):
        try:
            return datetime.fromisoformat(expires_at.replace("Z", "+00:00")) <= datetime.now(timezone.utc)
        except ValueError:
            return False
    return False
