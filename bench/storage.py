"""Snapshots and clones against data size, on each storage backend, with a
``docker run`` floor measured beside each figure (these machines are noisy).

    .venv/bin/python bench/storage.py                          # 1 GB, both backends, 50 thin clones
    .venv/bin/python bench/storage.py --sizes 1000,10000 --clones 50 --runs 7

For each backend (``copy``: file by file, the server stopped for a snapshot;
``btrfs``: subvolume snapshots of the running server) and data size:
- the snapshot, from request to ready, while a client opens a connection to
  the source every 50 ms (how many were refused): right after the data is
  loaded, and again (the steady state, against the floor);
- a clone of it, from request to its first SELECT 1, and the disk it added
  before anything was written to it;
- a template clone from the template's warm pool, and a plain pool claim.
Then, on btrfs, ``--clones`` clones of the first size's snapshot at once:
the disk they add, and that every one answers.

Needs the Docker engine, the postgres:17 image, and for btrfs root and
btrfs-progs (the service makes its pool as it would by default).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import docker
import psycopg
from run import Service, fill, floor_once, pct, sweep, table, wait_for_warm, wait_select1

# The client the tests poll a source with during its snapshot.
from tests.integration.test_data import Poller  # noqa: E402

MIB = 2**20


def disk_used(path: str) -> int:
    """Bytes used on the file system holding ``path``, once written out."""
    subprocess.run(["sync"], check=True)
    if path.startswith("/var/lib/dbprov"):
        # Deleted subvolumes are cleaned up in the background: wait for that too.
        subprocess.run(["btrfs", "subvolume", "sync", path], check=True, capture_output=True)
        subprocess.run(["btrfs", "filesystem", "sync", path], check=True, capture_output=True)
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def gone(service: Service, *database_ids: str) -> None:
    """Delete the databases and wait until their data is gone too."""
    for database_id in database_ids:
        service.request("DELETE", f"/databases/{database_id}")
    for database_id in database_ids:
        while service.request("GET", f"/databases/{database_id}")[1]["status"] != "deleted":
            time.sleep(0.1)


def created(service: Service, body: dict) -> tuple[float, dict]:
    """Request sent -> first SELECT 1."""
    started = time.perf_counter()
    status, answer = service.request("POST", "/databases", body)
    assert status == 201, answer
    wait_select1(answer["connection_uri"])
    return time.perf_counter() - started, answer


def sizes_on(service: Service, client, backend: str, where: str, sizes: list[int]) -> tuple[list, str | None]:
    rows, first_snapshot = [], None
    for megabytes in sizes:
        floor = floor_once(client)
        _, source = created(service, {})
        fill(source["connection_uri"], megabytes)
        with psycopg.connect(source["connection_uri"], autocommit=True) as conn:
            # As data that has been read is: hint bits set, so a clone's reads write nothing.
            conn.execute("VACUUM filler")
        poller = Poller(source["connection_uri"])
        poller.start()
        time.sleep(0.3)
        # Right after the load, the snapshot's checkpoint writes what the load
        # left in memory; the second is of a server in its steady state.
        took = []
        for _ in range(2):
            started = time.perf_counter()
            status, snapshot = service.request("POST", f"/databases/{source['id']}/snapshots")
            took.append(time.perf_counter() - started)
            assert status == 201 and snapshot["status"] == "ready", snapshot
            if len(took) == 1:
                loaded = snapshot
        time.sleep(0.3)
        poller.stopping.set()
        poller.join()
        service.request("DELETE", f"/snapshots/{loaded['id']}")
        loaded_s, snapshot_s = took
        before = disk_used(where)
        clone_s, clone = created(service, {"from_snapshot": snapshot["id"]})
        added = disk_used(where) - before
        with psycopg.connect(clone["connection_uri"]) as conn:
            assert conn.execute("SELECT count(*) FROM filler").fetchone()[0] == megabytes * 1024
        gone(service, clone["id"], source["id"])
        data = snapshot["size_bytes"]
        rows.append([
            backend, f"{megabytes} MB", data / MIB, loaded_s, snapshot_s, snapshot_s / floor, poller.refused,
            clone_s, clone_s / floor, floor, added / MIB, f"{100 * added / data:.2f}%",
        ])
        if first_snapshot is None:
            first_snapshot = snapshot["id"]
        else:
            service.request("DELETE", f"/snapshots/{snapshot['id']}")
    return rows, first_snapshot


def templates_on(service: Service, client, backend: str, runs: int) -> list:
    status, body = service.request("POST", "/templates", {"key": "bench"})
    assert status == 201, body
    fill(body["database"]["connection_uri"], 10)
    status, body = service.request("POST", "/templates/bench/finalize", {"pool_size": 2})
    assert status == 200, body
    times: dict[str, list[float]] = {"floor": [], "template": [], "claim": []}
    for _ in range(runs):
        times["floor"].append(floor_once(client))
        for kind, body in (("template", {"template": "bench"}), ("claim", {})):
            wait_for_warm(service, 4)
            elapsed, answer = created(service, body)
            assert "claim" in answer["phase_timings"], answer["phase_timings"]
            times[kind].append(elapsed)
            gone(service, answer["id"])
    service.request("DELETE", "/templates/bench")
    while service.request("GET", "/templates")[1]["items"]:
        time.sleep(0.1)
    floor, template, claim = (pct(times[kind], 50) for kind in ("floor", "template", "claim"))
    return [backend, floor, template, claim, floor / template, template / claim]


def many_clones(service: Service, snapshot_id: str, where: str, count: int, megabytes: int) -> None:
    before = disk_used(where)
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: created(service, {"from_snapshot": snapshot_id})[1], range(count)))
    took = time.perf_counter() - started
    for answer in answers:
        with psycopg.connect(answer["connection_uri"]) as conn:
            assert conn.execute("SELECT count(*) FROM filler").fetchone()[0] == megabytes * 1024
    added = disk_used(where) - before
    table(
        f"{count} clones of one {megabytes} MB snapshot at once, on btrfs (8 requests at a time)",
        ["clones", "all answered in s", "disk added MiB", "per clone MiB", "data MiB"],
        [[count, took, added / MIB, added / MIB / count, megabytes]],
    )
    gone(service, *(answer["id"] for answer in answers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000", help="MB of data, comma-separated")
    parser.add_argument("--clones", type=int, default=50, help="clones at once of the first size's snapshot")
    parser.add_argument("--runs", type=int, default=5, help="template clones and claims, each")
    parser.add_argument("--backends", default="copy,btrfs")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    client = docker.from_env()
    print(f"# dbprov storage benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores)")
    rows, templates = [], []
    try:
        for backend in args.backends.split(","):
            service = Service({"DBPROV_STORAGE": backend, "DBPROV_POOL_SIZE": "2"}).start()
            try:
                storage = service.request("GET", "/readyz")[1]["storage"]
                assert storage["backend"] == backend, storage
                where = storage.get("pool") or client.info()["DockerRootDir"]
                templates.append(templates_on(service, client, backend, args.runs))
                found, snapshot_id = sizes_on(service, client, backend, where, sizes)
                rows.extend(found)
                if backend == "btrfs" and args.clones:
                    many_clones(service, snapshot_id, where, args.clones, sizes[0])
                service.request("DELETE", f"/snapshots/{snapshot_id}")
                service.delete_all()
            finally:
                service.stop()
                sweep(client)
    finally:
        sweep(client)
    table(
        "Snapshot and clone against data size (a docker run floor measured beside each)",
        ["backend", "data", "MiB", "snapshot s, just loaded", "snapshot s", "snapshot / floor", "refused",
         "clone to SELECT 1 s",
         "clone / floor", "floor s", "clone's disk MiB", "of the data"],
        rows,
    )
    table(
        f"Template clone from its warm pool against a plain pool claim, request -> first SELECT 1 "
        f"(p50 of {args.runs} each)",
        ["backend", "floor s", "template clone s", "plain claim s", "floor / template", "template / claim"],
        templates,
    )


if __name__ == "__main__":
    main()
