"""Property-based requests, generated from openapi.yaml, against the live API with auth.

Bounded: a fixed number of examples per operation, no stateful runs. No
response may be a 5xx, and every response must match the document.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .conftest import ServiceProcess

pytestmark = pytest.mark.docker

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
    # The document allows any major version; which ones a service runs is
    # its setting (DBPROV_IMAGES). An unsupported one is a documented 422,
    # checked here instead of by "valid data must be accepted".
    unsupported = (
        case.operation.path == "/databases"
        and case.method == "POST"
        and isinstance(case.body, dict)
        and isinstance(case.body.get("version"), str)
        and re.fullmatch(r"[0-9]{1,3}", case.body["version"]) is not None
        and case.body["version"] not in SUPPORTED
    )
    # respond-async: created databases are started in the background while
    # the examples go on; the fixture deletes them all afterwards.
    response = case.call_and_validate(
        base_url=live.url,
        headers={"Authorization": f"Bearer {live.token}", "Prefer": "respond-async"},
        excluded_checks=[positive_data_acceptance] if unsupported else [],
    )
    if unsupported:
        assert 400 <= response.status_code < 500, response.text
