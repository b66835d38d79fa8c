"""/metrics in one process: figures from the store, HTTP durations, the exposition."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.composition import Services
from service.domain.models import Status
from service.store.crypto import Vault
from service.store.engine import Store

from .fakes import FakePostgres


@pytest.fixture
def settings(settings):
    """Two warm servers of version 17 kept ready."""
    return dataclasses.replace(settings, pool_sizes={"17": 2})


def scrape(client, **headers) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_databases_pool_phases_ports_and_requests(services, reconciler):
    reconciler.run_once(wait=True)
    services.auth_required = False
    client = create_app(services).test_client()
    claimed = client.post("/databases", json={}).get_json()
    client.post("/databases", json={}, headers={"Prefer": "respond-async"})
    client.get(f"/databases/{claimed['id']}")
    reconciler.run_once(wait=True)
    samples = scrape(client)
    assert value(samples, "dbprov_databases", status="ready") == 2
    assert value(samples, "dbprov_pool_servers", version="17", status="ready") == 2
    # Both creates were served from the pool, which was then stocked again.
    assert value(samples, "dbprov_pool_claims_total") == 2
    assert value(samples, "dbprov_provisioning_phase_seconds_count", phase="claim") == 2
    # Four servers were provisioned (two stocked, claimed, and stocked again):
    # the histogram keeps every one, though a claim replaced a record's phases.
    assert value(samples, "dbprov_provisioning_phase_seconds_count", phase="ready") == 4
    assert value(samples, "dbprov_provisioning_phase_seconds_bucket", phase="claim", le="+Inf") == 2
    assert value(samples, "dbprov_ports_in_use") == 4
    assert value(samples, "dbprov_ports_total") == 10
    assert value(
        samples, "dbprov_http_request_duration_seconds_count",
        method="GET", route="/databases/<string:database_id>", status="200",
    ) == 1


def test_the_storage_backend_and_a_pools_room(client, runtime):
    samples = scrape(client)
    assert value(samples, "dbprov_storage_backend", backend="copy") == 1
    assert not any(name.startswith("dbprov_storage_pool") for name, _ in samples)
    runtime.pool_free = 3 * 2**30
    samples = scrape(client)
    assert value(samples, "dbprov_storage_backend", backend="btrfs") == 1
    assert value(samples, "dbprov_storage_pool_free_bytes") == 3 * 2**30
    assert value(samples, "dbprov_storage_pool_size_bytes") == 2**36


def test_every_status_is_reported_even_when_none_has_it(client):
    samples = scrape(client)
    assert {status.value: value(samples, "dbprov_databases", status=status.value)
            for status in Status} == {status.value: 0 for status in Status}


def test_requests_are_counted_by_route_pattern_and_status(client):
    client.get("/healthz")
    client.get("/healthz")
    client.get("/databases/nosuchid")
    client.get("/no/such/path")
    samples = scrape(client)
    count = "dbprov_http_request_duration_seconds_count"
    assert value(samples, count, method="GET", route="/healthz", status="200") == 2
    assert value(samples, count, method="GET", route="/databases/<string:database_id>",
                 status="404") == 1
    assert value(samples, count, method="GET", route="unmatched", status="404") == 1
    assert value(samples, "dbprov_http_request_duration_seconds_bucket", method="GET",
                 route="/healthz", status="200", le="+Inf") == 2


def test_metrics_need_no_token(services):
    client = create_app(services).test_client()
    assert client.get("/databases").status_code == 401
    assert client.get("/metrics").status_code == 200


def test_each_app_counts_its_own_requests(services):
    first, second = create_app(services).test_client(), create_app(services).test_client()
    first.get("/healthz")
    count = ("dbprov_http_request_duration_seconds_count",
             frozenset({"method": "GET", "route": "/healthz", "status": "200"}.items()))
    assert scrape(first)[count] == 1
    assert count not in scrape(second)


def test_text_format_by_default_and_openmetrics_on_request(client):
    plain = client.get("/metrics")
    assert plain.content_type.startswith("text/plain; version=0.0.4")
    assert "# TYPE dbprov_databases gauge" in plain.get_data(as_text=True)
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.content_type.startswith("application/openmetrics-text")
    assert openmetrics.get_data(as_text=True).endswith("# EOF\n")


def test_an_unmigrated_store_answers_a_problem(settings, runtime):
    services = Services(
        settings, Store(settings.database_url), runtime, Vault(settings.secret_keys),
        server_admin=FakePostgres(runtime),
    )
    try:
        response = create_app(services).test_client().get("/metrics")
    finally:
        services.store.dispose()
    assert response.status_code == 503
    assert response.json["type"] == "urn:dbprov:problem:metadata-unavailable"
