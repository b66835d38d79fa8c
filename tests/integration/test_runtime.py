"""The runtime seam on the real engine: every method of DockerRuntime, on real
postgres servers, with real connections."""

from __future__ import annotations

import dataclasses
import io
import secrets
import time

import docker.errors
import psycopg
import pytest

from service.errors import ImageMissing, PortInUse, ServerFailed, TransientError
from service.runtime.docker import DockerRuntime
from service.runtime.protocol import ABSENT, RUNNING, ServerSpec
from service.storage import overlay
from service.storage.golden import GOLDEN_REPOSITORY, LABEL_GOLDEN_BASE, LABEL_GOLDEN_OF, golden_key
from service.storage.pool import open_pool

from .conftest import (
    INSTANCE,
    POOL,
    check_the_data_outlives_its_server,
    connected,
    free_port,
    needs_pool,
    wait_until,
)

# Alone: beside other tests, a golden overlay's probe failed now and then (its
# lower dir "no such file or directory"), and the runtime fell back to copies.
pytestmark = [pytest.mark.docker, pytest.mark.alone]

PASSWORD = "seam-test-password"


BTRFS = pytest.param("btrfs", marks=needs_pool)


# Each method on every way a server's data begins: an overlay on the golden
# volume; a copy of the golden data (an engine that cannot mount an overlay);
# the image's own initdb (DBPROV_GOLDEN_IMAGES=false, or a golden image that
# could not be made); a snapshot of the golden subvolume on the btrfs pool.
@pytest.fixture(params=["overlay", "copy", "initdb", BTRFS])
def runtime(request, docker_client, monkeypatch):
    runtime = DockerRuntime(
        instance=INSTANCE, network=f"dbprov-{INSTANCE}", bind_address="127.0.0.1",
        probe_host="127.0.0.1", pull=True, golden=request.param != "initdb",
        pool=(lambda: open_pool(POOL, 64 * 2**30, 2**30))
        if request.param == "btrfs" else None,
    )
    if request.param == "btrfs":
        assert runtime.storage_report().backend == "btrfs", runtime.storage_report()
    if request.param == "copy":
        golden_image = runtime.storage.golden_image
        monkeypatch.setattr(
            runtime.storage, "golden_image",
            lambda spec, base: (golden := golden_image(spec, base)) and golden._replace(volume=None),
        )
    runtime.way = request.param
    made: list[str] = []
    runtime.made = made
    yield runtime
    for database_id in made:
        runtime.remove_server(database_id)


def new_server(runtime, image: str = "postgres:17", password: str = PASSWORD) -> tuple[ServerSpec, str]:
    database_id = secrets.token_hex(6)
    runtime.made.append(database_id)
    spec = ServerSpec(
        database_id=database_id, image=image,
        superuser="admin", superuser_password=password, extra_environment={"POSTGRES_DB": "postgres"},
        port=free_port(),
    )
    return spec, database_id


def uri(endpoint, password: str = PASSWORD, user: str = "admin") -> str:
    return f"postgresql://{user}:{password}@{endpoint.host}:{endpoint.port}/postgres"


def connect_when_up(
    endpoint, timeout: float = 60, password: str = PASSWORD, user: str = "admin"
) -> psycopg.Connection:
    return connected(uri(endpoint, password, user), timeout)


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

    check_the_data_outlives_its_server(runtime, spec, endpoint, connect_when_up)


def test_a_job_runs_beside_a_server_on_its_data(runtime):
    spec, database_id = new_server(runtime)
    connect_when_up(runtime.ensure_server(spec)).close()
    result = runtime.run_job(database_id, ["sh", "-c", "cat \"$PGDATA/PG_VERSION\""])
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
        runtime.ensure_server(dataclasses.replace(other, port=first.port))
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
    # Nothing was made: neither a server nor its data.
    assert runtime.inspect_server(database_id) is None


golden_only = pytest.mark.parametrize("runtime", ["overlay", "copy", BTRFS], indirect=True)
overlay_only = pytest.mark.parametrize("runtime", ["overlay"], indirect=True)


def golden_images(docker_client, image: str) -> list:
    return docker_client.images.list(filters={"label": f"{LABEL_GOLDEN_OF}={image}"})


@golden_only
def test_servers_on_golden_copies_skip_initdb_and_each_has_its_own_password(runtime, docker_client):
    first, first_id = new_server(runtime, password="first-'quoted\\-password")
    second, second_id = new_server(runtime, password="second-password")
    connect_when_up(runtime.ensure_server(first), password=first.environment["POSTGRES_PASSWORD"]).close()
    connect_when_up(runtime.ensure_server(second), password="second-password").close()
    # Neither server ran initdb: the official entrypoint says so when it does.
    for database_id in (first_id, second_id):
        assert "init process complete" not in runtime.server_logs(database_id, tail=200)
        container = docker_client.containers.get(f"dbprov-{database_id}")
        assert container.attrs["Config"]["User"] == "postgres"
        assert container.image.tags[0].startswith(f"{GOLDEN_REPOSITORY}:")
    # Each superuser has only its own password; the golden one is known to nobody.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(uri(runtime.endpoint(second_id), first.environment["POSTGRES_PASSWORD"]), connect_timeout=5)
    golden = docker_client.containers.get(f"dbprov-{first_id}").image
    assert "POSTGRES_PASSWORD=" in golden.attrs["Config"]["Env"]
    assert golden.labels[LABEL_GOLDEN_BASE] == docker_client.images.get("postgres:17").id
    # The first start's step is done once: the mark is gone, a restart is a plain start.
    marked = runtime.run_job(first_id, ["sh", "-c", 'test -e "$PGDATA/dbprov-golden" && echo marked || echo clean'])
    assert marked.output.strip() == "clean"
    runtime.stop_server(first_id)
    runtime.start_server(first_id)
    connect_when_up(runtime.endpoint(first_id), password=first.environment["POSTGRES_PASSWORD"]).close()
    # No volume but the servers' own (and the golden one an overlay stands
    # on): the image's declared volume is a tmpfs.
    volumes = docker_client.volumes.list(filters={"label": f"io.dbprov.instance={INSTANCE}"})
    mounted = {m.get("Name") for c in (first_id, second_id)
               for m in docker_client.containers.get(f"dbprov-{c}").attrs["Mounts"] if m["Type"] == "volume"}
    own = {f"dbprov-{first_id}-data", f"dbprov-{second_id}-data"}
    assert own <= {v.name for v in volumes}
    layers = {f"dbprov-{c}-{layer}" for c in (first_id, second_id) for layer in ("upper", "work")}
    expected = {golden_volume(docker_client, first_id)} | layers if runtime.way == "overlay" else set()
    assert mounted - own == expected


def golden_volume(docker_client, database_id: str) -> str:
    return docker_client.volumes.get(f"dbprov-{database_id}-data").attrs["Labels"]["io.dbprov.lower"]


def own_runtime(instance: str = INSTANCE, **options) -> DockerRuntime:
    """A runtime of the test's own, for tests that watch its golden copies."""
    runtime = DockerRuntime(
        instance=instance, network=f"dbprov-{INSTANCE}", bind_address="127.0.0.1", probe_host="127.0.0.1",
        **options,
    )
    runtime.made = []
    return runtime


def own_superuser(runtime, docker_client, name: str) -> tuple[ServerSpec, str, str]:
    """A server whose superuser is of its own, so its golden copy is made here; the key."""
    spec, database_id = new_server(runtime)
    spec = dataclasses.replace(
        spec, superuser=f"{name}_{INSTANCE[5:]}"
    )
    return spec, database_id, golden_key(spec, docker_client.api.inspect_image(spec.image))


def remove_golden(docker_client, key: str) -> None:
    try:
        docker_client.images.remove(f"{GOLDEN_REPOSITORY}:{key}", force=True)
    except docker.errors.ImageNotFound:
        pass  # pruned by the test
    for volume in docker_client.volumes.list(filters={"name": f"{GOLDEN_REPOSITORY}-{key}"}):
        volume.remove(force=True)


@overlay_only
def test_an_overlay_shares_the_golden_files_which_stay_while_a_server_stands_on_them(runtime, docker_client):
    spec, database_id = new_server(runtime)
    with connect_when_up(runtime.ensure_server(spec)) as conn:
        conn.execute("CREATE TABLE mine AS SELECT 1 AS n")
    data = docker_client.volumes.get(f"dbprov-{database_id}-data")
    lower = docker_client.volumes.get(golden_volume(docker_client, database_id))
    assert data.attrs["Options"]["type"] == "overlay"
    assert lower.attrs["Mountpoint"] in data.attrs["Options"]["o"]
    assert lower.attrs["Labels"][LABEL_GOLDEN_BASE] == docker_client.images.get("postgres:17").id
    # The golden files are never written: the server's changes are its own.
    count = ["sh", "-c", f"ls {overlay.LAYERS_AT}/lower/data/base | wc -l"]
    before = int(runtime.run_job(database_id, count).output)
    with connect_when_up(runtime.endpoint(database_id)) as conn:
        conn.execute("CREATE DATABASE another")
        databases = conn.execute("SELECT count(*) FROM pg_database").fetchone()[0]
    assert before == databases - 1
    assert int(runtime.run_job(database_id, count).output) == before
    # No volume of the server is unused in the engine's eyes, so none is pruned:
    # not the golden one, not those the overlay is made of; even when stopped.
    runtime.stop_server(database_id)
    dangling = {v.name for v in docker_client.volumes.list(filters={"dangling": True})}
    assert not {f"dbprov-{database_id}-{name}" for name in ("data", "upper", "work")} & dangling
    assert lower.name not in dangling
    with pytest.raises(docker.errors.APIError, match="in use"):
        lower.remove()
    runtime.remove_server(database_id)
    left = docker_client.volumes.list(filters={"name": f"dbprov-{database_id}"})
    assert not left, [v.name for v in left]
    lower.reload()  # still there, for the servers to come


def test_a_golden_volume_removed_behind_its_back_is_never_mounted_by_name_and_is_made_again(docker_client):
    runtime = own_runtime()
    spec, database_id, key = own_superuser(runtime, docker_client, "gone")
    user = spec.environment["POSTGRES_USER"]
    try:
        with connect_when_up(runtime.ensure_server(spec), user=user) as conn:
            conn.execute("CREATE TABLE kept AS SELECT 7 AS n")
        lower = golden_volume(docker_client, database_id)
        # Its data kept without its server: then nothing holds the golden volume.
        runtime.remove_server(database_id, keep_data=True)
        docker_client.volumes.get(lower).remove()
        # Until it may be made again, the database on it fails, saying why,
        # and a new server gets a copy of the golden data instead.
        with pytest.raises(ServerFailed, match=f"golden volume {lower} .* is gone"):
            runtime.ensure_server(spec)
        assert not docker_client.volumes.list(filters={"name": lower}), "no empty volume in its place"
        other, other_id = new_server(runtime)
        other = dataclasses.replace(other, superuser=spec.superuser)
        connect_when_up(runtime.ensure_server(other), user=user).close()
        assert "io.dbprov.lower" not in docker_client.volumes.get(f"dbprov-{other_id}-data").attrs["Labels"]
        # Then it is made again from the image, the same files: the database
        # comes back on it with its own changes, and new servers are overlays again.
        runtime.storage._golden_refill.clear()
        with connect_when_up(runtime.ensure_server(spec), user=user) as conn:
            assert conn.execute("SELECT n FROM kept").fetchone() == (7,)
        third, third_id = new_server(runtime)
        third = dataclasses.replace(third, superuser=spec.superuser)
        connect_when_up(runtime.ensure_server(third), user=user).close()
        assert golden_volume(docker_client, third_id) == lower
    finally:
        for made in runtime.made:
            runtime.remove_server(made)
        remove_golden(docker_client, key)


def test_a_golden_volume_that_goes_while_a_server_is_made_costs_a_retry_not_the_create(
    docker_client, monkeypatch
):
    """Removed between the look and the container's create, the engine makes an
    empty volume of its name for the mount: that server would have no data."""
    runtime = own_runtime()
    spec, database_id, key = own_superuser(runtime, docker_client, "racing")
    user = spec.environment["POSTGRES_USER"]
    make_overlay = runtime.storage._make_overlay

    def and_gone(name, labels, lower, lower_path):
        make_overlay(name, labels, lower, lower_path)
        docker_client.volumes.get(lower).remove()

    try:
        first, first_id = new_server(runtime)
        first = dataclasses.replace(first, superuser=spec.superuser)
        connect_when_up(runtime.ensure_server(first), user=user).close()  # the golden copy is made
        lower = golden_volume(docker_client, first_id)
        runtime.remove_server(first_id)
        monkeypatch.setattr(runtime.storage, "_make_overlay", and_gone)
        with pytest.raises(TransientError, match=f"golden volume {lower} went"):
            runtime.ensure_server(spec)
        # Nothing half-made is left: no server, no data, no empty volume of the golden name.
        assert runtime.inspect_server(database_id) is None
        assert not docker_client.volumes.list(filters={"name": lower})
        monkeypatch.undo()
        # Tried again (the reconciler's retry), it stands on a golden volume made anew.
        runtime.storage._golden_refill.clear()
        with connect_when_up(runtime.ensure_server(spec), user=user) as conn:
            assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        assert golden_volume(docker_client, database_id) == lower
    finally:
        for made in runtime.made:
            runtime.remove_server(made)
        remove_golden(docker_client, key)


def test_golden_copies_are_shared_and_pruned_once_no_server_stands_on_them(docker_client):
    runtime = own_runtime(client=docker_client)
    other = own_runtime(f"{INSTANCE}-other", client=docker_client)
    spec, database_id, key = own_superuser(runtime, docker_client, "shared")
    try:
        runtime.ensure_server(spec)
        mine = golden_volume(docker_client, database_id)
        theirs, theirs_id = new_server(other)
        other.ensure_server(dataclasses.replace(theirs, superuser=spec.superuser))
        # Another installation on the engine stands on the same golden copy.
        assert golden_volume(docker_client, theirs_id) == mine
        assert f"{GOLDEN_REPOSITORY}:{key}" not in " ".join(runtime.prune_caches())
        assert docker_client.volumes.get(mine)
        for made, owner in ((database_id, runtime), (theirs_id, other)):
            owner.remove_server(made)
        removed = runtime.prune_caches()
        assert f"{GOLDEN_REPOSITORY}:{key}" in removed and mine in removed
        assert not docker_client.images.list(name=f"{GOLDEN_REPOSITORY}:{key}")
    finally:
        for owner in (runtime, other):
            for made in owner.made:
                owner.remove_server(made)
        remove_golden(docker_client, key)


def test_a_server_never_runs_initdb_on_a_golden_volume_with_no_data(docker_client):
    runtime = own_runtime()
    spec, database_id, key = own_superuser(runtime, docker_client, "emptied")
    try:
        runtime.ensure_server(spec)
        runtime.stop_server(database_id)
        # The golden files gone from under the overlay (as an emptied volume would be).
        lower = golden_volume(docker_client, database_id)
        emptier = docker_client.containers.run(
            "postgres:17", ["sh", "-c", "rm -rf /lower/data"], detach=True, user="root",
            volumes={lower: {"bind": "/lower", "mode": "rw"}},
        )
        assert emptier.wait()["StatusCode"] == 0
        # With the anonymous volume the image declares: remove=True would leave it behind.
        emptier.remove(v=True)
        docker_client.api.start(f"dbprov-{database_id}")
        wait_until(lambda: runtime.inspect_server(database_id).state != RUNNING, timeout=30,
                   what="the server to refuse")
        logs = runtime.server_logs(database_id)
        assert "no data directory under this server" in logs and "initdb" not in logs
    finally:
        for made in runtime.made:
            runtime.remove_server(made)
        remove_golden(docker_client, key)


@overlay_only
def test_an_overlay_runs_on_when_golden_copies_are_turned_off(runtime, docker_client):
    spec, database_id = new_server(runtime)
    with connect_when_up(runtime.ensure_server(spec)) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 7 AS n")
    runtime.remove_server(database_id, keep_data=True)
    plain = DockerRuntime(
        instance=INSTANCE, network=f"dbprov-{INSTANCE}", bind_address="127.0.0.1", probe_host="127.0.0.1",
        golden=False,
    )
    with connect_when_up(plain.ensure_server(spec)) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (7,)
    # A job finds the data where the server has it.
    assert plain.run_job(database_id, ["sh", "-c", 'cat "$PGDATA/PG_VERSION"']).output.strip() == "17"


def test_an_engine_without_overlays_gets_copies_of_the_golden_data(docker_client, monkeypatch):
    runtime = DockerRuntime(
        instance=INSTANCE, network=f"dbprov-{INSTANCE}", bind_address="127.0.0.1", probe_host="127.0.0.1",
    )
    make_overlay = runtime.storage._make_overlay

    def refused(database_id, *args):
        if database_id.endswith("-probe"):
            raise docker.errors.APIError("overlay: mount refused")
        return make_overlay(database_id, *args)

    monkeypatch.setattr(runtime.storage, "_make_overlay", refused)
    runtime.made = []
    spec, database_id, key = own_superuser(runtime, docker_client, "nooverlay")
    try:
        connect_when_up(runtime.ensure_server(spec), user=spec.environment["POSTGRES_USER"]).close()
        assert "init process complete" not in runtime.server_logs(database_id, tail=200)
        assert "io.dbprov.lower" not in docker_client.volumes.get(f"dbprov-{database_id}-data").attrs["Labels"]
        assert not docker_client.volumes.list(filters={"name": f"{GOLDEN_REPOSITORY}-{key}"})
    finally:
        runtime.remove_server(database_id)
        remove_golden(docker_client, key)


@golden_only
def test_a_changed_image_gets_a_new_golden_image_and_the_old_one_goes(runtime, docker_client):
    image = f"dbprov-test-golden-{INSTANCE}:17"

    built = []

    def build(revision: str) -> str:
        # Of this run only: the same build elsewhere would be the same image, from the cache.
        dockerfile = io.BytesIO(f"FROM postgres:17\nLABEL revision={revision} run={INSTANCE}\n".encode())
        built.append(docker_client.images.build(fileobj=dockerfile, tag=image, rm=True)[0].id)
        return built[-1]

    try:
        old_id = build("1")
        spec, database_id = new_server(runtime, image=image)
        connect_when_up(runtime.ensure_server(spec)).close()
        runtime.remove_server(database_id)
        (old_golden,) = golden_images(docker_client, image)
        assert old_golden.labels[LABEL_GOLDEN_BASE] == old_id
        new_id = build("2")
        assert new_id != old_id
        spec, database_id = new_server(runtime, image=image)
        connect_when_up(runtime.ensure_server(spec)).close()
        (new_golden,) = golden_images(docker_client, image)
        assert new_golden.labels[LABEL_GOLDEN_BASE] == new_id
        if runtime.way == "overlay":
            (volume,) = docker_client.volumes.list(filters={"label": f"{LABEL_GOLDEN_OF}={image}"})
            assert volume.attrs["Labels"][LABEL_GOLDEN_BASE] == new_id
        runtime.remove_server(database_id)
    finally:
        for golden in golden_images(docker_client, image):
            docker_client.images.remove(golden.id, force=True)
        for volume in docker_client.volumes.list(filters={"label": f"{LABEL_GOLDEN_OF}={image}"}):
            volume.remove()
        # By id, not by pruning what is dangling: that would reach other
        # tests' images, built at the same time.
        for made in built:
            try:
                docker_client.images.remove(made, force=True)
            except docker.errors.ImageNotFound:
                pass


@golden_only
def test_a_golden_build_left_by_a_crash_is_cleared(runtime, docker_client, monkeypatch):
    image = f"dbprov-test-golden-{INSTANCE}:crash"
    docker_client.images.get("postgres:17").tag(image)
    base = docker_client.api.inspect_image(image)
    spec, database_id = new_server(runtime, image=image)
    # A superuser of its own: a golden image of its own, not made yet.
    spec = dataclasses.replace(spec, superuser=f"crash_{INSTANCE[5:]}")
    key = golden_key(spec, base)
    try:
        # What a process killed in the middle of a build leaves: its builder, running.
        docker_client.containers.run(
            image, name=f"{GOLDEN_REPOSITORY}-{key}", detach=True, network_mode="none",
            environment={"POSTGRES_PASSWORD": "x"}, labels={"io.dbprov.instance": INSTANCE},
        )
        # ... and the container that tries an overlay on the golden volume.
        docker_client.containers.create(image, name=f"{GOLDEN_REPOSITORY}-{key}-probe", command="true")
        monkeypatch.setattr("service.storage.golden._GOLDEN_STALE", 0.0)
        connect_when_up(runtime.ensure_server(spec), user=spec.environment["POSTGRES_USER"]).close()
        assert docker_client.containers.get(f"dbprov-{database_id}").image.tags[0] == f"{GOLDEN_REPOSITORY}:{key}"
        left = docker_client.containers.list(all=True, filters={"name": f"{GOLDEN_REPOSITORY}-{key}"})
        assert not left, [(c.name, c.status, c.attrs["Created"]) for c in left]
        runtime.remove_server(database_id)
    finally:
        # What the test left as a crash would (the builder and its probe), should it
        # fail before the runtime clears them; by name, as their image is postgres:17's.
        for container in docker_client.containers.list(all=True, filters={"name": f"{GOLDEN_REPOSITORY}-{key}"}):
            container.remove(force=True, v=True)
        for golden in golden_images(docker_client, image):
            docker_client.images.remove(golden.id, force=True)
        for volume in docker_client.volumes.list(filters={"label": f"{LABEL_GOLDEN_OF}={image}"}):
            volume.remove()
        docker_client.images.remove(image)


def test_the_engine_events_tell_an_unbroken_server_from_one_that_died(runtime, docker_client):
    spec, database_id = new_server(runtime)
    connect_when_up(runtime.ensure_server(spec)).close()
    wait_until(lambda: runtime.runs_unbroken(database_id) is True, timeout=10, what="the events to follow it")
    docker_client.containers.get(f"dbprov-{database_id}").kill()
    wait_until(lambda: runtime.runs_unbroken(database_id) is False, timeout=5, what="the death to be seen")
    # Started again (as drift repair would), it stays untrusted all the same.
    runtime.start_server(database_id)
    connect_when_up(runtime.endpoint(database_id)).close()
    assert runtime.runs_unbroken(database_id) is False
    # A server made anew under the id is followed afresh.
    runtime.remove_server(database_id, keep_data=True)
    connect_when_up(runtime.ensure_server(spec)).close()
    wait_until(lambda: runtime.runs_unbroken(database_id) is True, timeout=10, what="the new server to be seen")
    # Unknown ids are not guessed at.
    assert runtime.runs_unbroken("000000000000") is None


@golden_only
def test_a_lock_file_left_empty_by_a_kill_does_not_keep_the_server_down(runtime, docker_client):
    spec, database_id = new_server(runtime)
    connect_when_up(runtime.ensure_server(spec)).close()
    # What a kill while PostgreSQL writes its lock file leaves behind.
    emptied = runtime.run_job(database_id, ["sh", "-c", ': > "$PGDATA/postmaster.pid"'])
    assert emptied.exit_code == 0, emptied.output
    docker_client.containers.get(f"dbprov-{database_id}").kill()
    runtime.start_server(database_id)
    connect_when_up(runtime.endpoint(database_id)).close()
