"""The runtime seam on the real engine: every method of DockerRuntime, on real
postgres servers, with real connections."""

from __future__ import annotations

import secrets
import time

import psycopg
import pytest

from service.docker_runtime import DockerRuntime
from service.errors import ImageMissing, PortInUse
from service.runtime import ABSENT, RUNNING, STOPPED, ServerSpec

from .conftest import INSTANCE, free_port

pytestmark = pytest.mark.docker

PASSWORD = "seam-test-password"


@pytest.fixture
def runtime(docker_client):
    runtime = DockerRuntime(
        instance=INSTANCE, network=f"dbprov-{INSTANCE}", bind_address="127.0.0.1",
        probe_host="127.0.0.1", pull=True,
    )
    made: list[str] = []
    runtime.made = made
    yield runtime
    for database_id in made:
        runtime.remove_server(database_id)


def new_server(runtime, image: str = "postgres:17") -> tuple[ServerSpec, str]:
    database_id = secrets.token_hex(6)
    runtime.made.append(database_id)
    spec = ServerSpec(
        database_id=database_id, image=image,
        environment={"POSTGRES_USER": "admin", "POSTGRES_PASSWORD": PASSWORD, "POSTGRES_DB": "postgres"},
        port=free_port(),
    )
    return spec, database_id


def uri(endpoint) -> str:
    return f"postgresql://admin:{PASSWORD}@{endpoint.host}:{endpoint.port}/postgres"


def connect_when_up(endpoint, timeout: float = 60) -> psycopg.Connection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(uri(endpoint), connect_timeout=2, autocommit=True)
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)


def test_a_server_lives_stops_starts_and_goes_with_its_data(runtime):
    spec, database_id = new_server(runtime)
    endpoint = runtime.ensure_server(spec)
    assert endpoint == runtime.endpoint(database_id)
    assert endpoint.port == spec.port
    with connect_when_up(endpoint) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 7 AS n")
    assert runtime.ensure_server(spec) == endpoint  # repeating it changes nothing
    assert runtime.inspect_server(database_id).state == RUNNING
    assert "database system is ready" in runtime.server_logs(database_id)

    runtime.stop_server(database_id)
    stopped = runtime.inspect_server(database_id)
    assert stopped.state == STOPPED and stopped.has_data
    assert {s.database_id: s.state for s in runtime.list_servers()}[database_id] == STOPPED
    runtime.start_server(database_id)
    with connect_when_up(endpoint) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (7,)

    runtime.remove_server(database_id, keep_data=True)
    assert runtime.inspect_server(database_id).state == ABSENT
    # Made anew on the data it left.
    with connect_when_up(runtime.ensure_server(spec)) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (7,)
    runtime.remove_server(database_id)
    assert runtime.inspect_server(database_id) is None
    assert database_id not in {s.database_id for s in runtime.list_servers()}


def test_a_job_runs_beside_a_server_on_its_data(runtime):
    spec, database_id = new_server(runtime)
    connect_when_up(runtime.ensure_server(spec)).close()
    result = runtime.run_job(database_id, ["sh", "-c", "cat /var/lib/postgresql/data/PG_VERSION"])
    assert result.exit_code == 0 and result.output.strip() == "17"
    failing = runtime.run_job(database_id, ["sh", "-c", "echo no such thing >&2; exit 4"])
    assert failing.exit_code == 4 and "no such thing" in failing.output


def test_copied_data_makes_an_independent_server(runtime):
    source, source_id = new_server(runtime)
    with connect_when_up(runtime.ensure_server(source)) as conn:
        conn.execute("CREATE TABLE origin AS SELECT 'source' AS side")
    runtime.stop_server(source_id)  # a consistent copy
    target, target_id = new_server(runtime)
    assert runtime.copy_data(source_id, target_id, source.image) > 1_000_000
    runtime.start_server(source_id)
    with connect_when_up(runtime.ensure_server(target)) as conn:
        assert conn.execute("SELECT side FROM origin").fetchone() == ("source",)
        conn.execute("INSERT INTO origin VALUES ('clone')")
    with connect_when_up(runtime.endpoint(source_id)) as conn:
        assert conn.execute("SELECT side FROM origin").fetchall() == [("source",)]


def test_a_taken_port_is_reported_and_nothing_is_left(runtime, docker_client):
    spec, database_id = new_server(runtime)
    first = runtime.ensure_server(spec)
    other, other_id = new_server(runtime)
    with pytest.raises(PortInUse):
        runtime.ensure_server(ServerSpec(other_id, other.image, other.environment, port=first.port))
    assert runtime.inspect_server(other_id).state == ABSENT  # its data only, no server


def test_a_network_removed_behind_its_back_is_made_again(runtime, docker_client):
    spec, database_id = new_server(runtime)
    runtime.ensure_server(spec)
    runtime.remove_server(database_id)
    docker_client.networks.get(f"dbprov-{INSTANCE}").remove()
    again, again_id = new_server(runtime)
    connect_when_up(runtime.ensure_server(again)).close()
    assert docker_client.networks.list(names=[f"dbprov-{INSTANCE}"])


def test_a_missing_image_is_reported_at_once(runtime):
    assert runtime.has_image("postgres:17")
    assert not runtime.has_image("postgres:16")
    started = time.monotonic()
    with pytest.raises(ImageMissing, match="cannot pull postgres:16"):
        runtime.pull_image("postgres:16")
    spec, database_id = new_server(runtime, image="postgres:16")
    with pytest.raises(ImageMissing):
        runtime.ensure_server(spec)
    assert time.monotonic() - started < 30
    # No server was made; the reconciler's failure handling removes the data.
    assert runtime.inspect_server(database_id).state == ABSENT
