"""The btrfs storage pool, for real: a loop file made and mounted, thin copies, and
data from before the pool carried into it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from service.errors import InsufficientStorage
from service.storage.pool import Pool, open_pool

from .conftest import managed, needs_pool, wait_until
from .test_data import create, rows, snapshot_of

pytestmark = [pytest.mark.docker, needs_pool]

MIB = 2**20
ASYNC = {"Prefer": "respond-async"}


def used(pool_root: str) -> int:
    """Bytes the pool holds, once btrfs has committed what was written."""
    subprocess.run(["btrfs", "filesystem", "sync", pool_root], check=True, capture_output=True)
    stat = os.statvfs(pool_root)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


@pytest.fixture
def loop_pool(tmp_path):
    pool, reason = open_pool(tmp_path / "pool", 2 * 2**30, 64 * MIB)
    assert pool is not None, reason
    yield pool
    subprocess.run(["umount", str(pool.root)], check=True)


def test_a_pool_made_on_a_loop_file_shares_blocks_until_written(loop_pool, tmp_path):
    assert loop_pool.backing == tmp_path / "pool.img"
    # Found mounted by the next process: the same pool, the same loop file.
    again, reason = open_pool(tmp_path / "pool", 2 * 2**30, 64 * MIB)
    assert again.backing == loop_pool.backing and "loop file" in reason
    source = loop_pool.create("source")
    (source / "data").write_bytes(os.urandom(300 * MIB))
    before = used(str(loop_pool.root))
    copies = [loop_pool.snapshot(source, f"copy-{n}") for n in range(5)]
    # Five copies of 300 MiB cost almost nothing until written.
    assert used(str(loop_pool.root)) - before < 5 * MIB
    with open(copies[0] / "data", "r+b") as file:
        file.write(b"changed")
    assert (source / "data").read_bytes()[:7] != b"changed"
    # A snapshot made again (after a crash left one) is the source's anew.
    assert (loop_pool.snapshot(source, "copy-0") / "data").read_bytes()[:7] != b"changed"
    # Made now, whatever its source's times say: data no volume binds is an
    # orphan to prune only once it is older than a volume takes to be made.
    assert (datetime.now(timezone.utc) - loop_pool.made_at("copy-4")).total_seconds() < 60
    assert loop_pool.orphans({"source"}, timedelta(0)) == {f"copy-{n}" for n in range(5)}
    assert loop_pool.orphans({"source"}, timedelta(minutes=10)) == set()
    for n in range(5):
        loop_pool.delete(f"copy-{n}")
    assert loop_pool.names() == {"source"}
    # Less free than it must keep: refused, saying how much there is.
    with pytest.raises(InsufficientStorage, match="MiB free"):
        Pool(loop_pool.root, loop_pool.free() + 1, loop_pool.backing).check_room("a copy")


@pytest.mark.alone
def test_clones_of_a_running_server_cost_no_disk_until_written(service):
    pool = service.request("GET", "/readyz").json()["storage"]["pool"]
    source = create(service)
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("CREATE TABLE item AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 400000) g")
    with psycopg.connect(source["connection_uri"], autocommit=True) as conn:
        # As data that has been read once is: else each clone's first read
        # writes every page (hint bits), which is a write like any other.
        conn.execute("VACUUM item")
    snapshot = snapshot_of(service, source["id"])
    assert snapshot["size_bytes"] > 100 * MIB
    before = used(pool)
    clones = [create(service, from_snapshot=snapshot["id"]) for _ in range(3)]
    for clone in clones:
        assert len(rows(clone["connection_uri"])) == 400000
    grown = used(pool) - before
    # Three running clones of over 100 MiB: what each wrote starting up, no copy.
    assert grown < snapshot["size_bytes"] // 4, f"{grown / MIB:.1f} MiB for three clones"
    # A reset swaps the data for a new thin copy of the snapshot.
    with psycopg.connect(clones[0]["connection_uri"]) as conn:
        conn.execute("DELETE FROM item")
    assert service.request("POST", f"/databases/{clones[0]['id']}/reset").status_code == 200
    assert len(rows(clones[0]["connection_uri"])) == 400000
    ids = [source["id"], snapshot["id"], *(clone["id"] for clone in clones)]
    assert {f"dbprov-{i}-data" for i in ids} <= set(os.listdir(f"{pool}/data"))
    service.delete_all()
    assert not {f"dbprov-{i}-data" for i in ids} & set(os.listdir(f"{pool}/data"))


@pytest.mark.parametrize("service", [{"DBPROV_STORAGE": "copy"}], indirect=True)
def test_data_from_before_the_pool_is_served_and_copied_into_it(service):
    source = create(service)
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
        conn.execute("INSERT INTO item VALUES (1), (2)")
    service.stop()
    service.env["DBPROV_STORAGE"] = "btrfs"
    service.start()
    pool = service.request("GET", "/readyz").json()["storage"]["pool"]
    assert rows(source["connection_uri"]) == [1, 2]
    snapshot = snapshot_of(service, source["id"])
    assert f"dbprov-{snapshot['id']}-data" in os.listdir(f"{pool}/data")
    clone = create(service, from_snapshot=snapshot["id"])
    assert rows(clone["connection_uri"]) == [1, 2]
    # The source stays on its own volume, and runs on it after a restart of its server.
    assert service.request("POST", f"/databases/{source['id']}/stop").status_code == 202
    service.wait_for_status(source["id"], "stopped")
    assert service.request("POST", f"/databases/{source['id']}/start").json()["status"] == "ready"
    assert rows(source["connection_uri"]) == [1, 2]


def test_data_gone_from_the_pool_is_lost_not_made_anew_empty(service, docker_client):
    pool = service.request("GET", "/readyz").json()["storage"]["pool"]
    created = create(service)
    with psycopg.connect(created["connection_uri"]) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 7 AS n")
    service.request("POST", f"/databases/{created['id']}/stop")
    service.wait_for_status(created["id"], "stopped")
    # Its container and its data go, its volume stays: bound to nothing now.
    docker_client.containers.get(f"dbprov-{created['id']}").remove()
    subprocess.run(["btrfs", "subvolume", "delete", f"{pool}/data/dbprov-{created['id']}-data"],
                   check=True, capture_output=True)
    started = service.request("POST", f"/databases/{created['id']}/start")
    assert started.status_code == 410 and started.json()["type"] == "urn:dbprov:problem:data-lost", started.text
    assert "gone from the storage pool" in service.request("GET", f"/databases/{created['id']}").json()["last_error"]
    assert not docker_client.containers.list(all=True, filters={"name": f"dbprov-{created['id']}"})


def test_kill_9_mid_snapshot_or_clone_leaves_nothing_half_made(service, docker_client):
    pool = service.request("GET", "/readyz").json()["storage"]["pool"]
    source = create(service)
    with psycopg.connect(source["connection_uri"]) as conn:
        conn.execute("CREATE TABLE item AS SELECT g AS id FROM generate_series(1, 50000) g")
    snapshots, clones = [], []
    # With the request, while the copy is made, about when the clone starts.
    for delay in (0.0, 0.05, 0.3):
        snapshot = service.request("POST", f"/databases/{source['id']}/snapshots", headers=ASYNC)
        clone = service.request("POST", "/databases", json={"from_database": source["id"]}, headers=ASYNC)
        assert (snapshot.status_code, clone.status_code) == (202, 202), (snapshot.text, clone.text)
        snapshots.append(snapshot.json()["id"])
        clones.append(clone.json()["id"])
        time.sleep(delay)
        service.stop(signal.SIGKILL)
        service.start()
        wait_until(lambda: service.request("GET", f"/snapshots/{snapshots[-1]}").json()["status"] != "pending",
                   timeout=60, what="the snapshot to settle")
    assert [service.request("GET", f"/snapshots/{s}").json()["status"] for s in snapshots] == ["ready"] * 3
    for clone_id in clones:
        service.wait_for_status(clone_id, "ready")
        uri = service.request("GET", f"/databases/{clone_id}/credentials").json()["connection_uri"]
        assert rows(uri) == list(range(1, 50001))
    # Every volume binds whole data in the pool, and no data of theirs is without its volume.
    volumes = managed(docker_client, "volumes")
    for volume in volumes:
        bound = volume.attrs["Labels"]["io.dbprov.subvolume"]
        assert os.path.isfile(f"{bound}/PG_VERSION") or os.path.isfile(f"{bound}/data/PG_VERSION"), bound
    ours = {f"dbprov-{i}-data" for i in [source["id"], *snapshots, *clones]}
    assert ours & set(os.listdir(f"{pool}/data")) <= {volume.name for volume in volumes}
    assert "Traceback" not in service.log_path.read_text()
