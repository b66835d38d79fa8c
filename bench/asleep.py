"""Density with scale to zero: many databases registered, few of them in use.

    .venv/bin/python bench/asleep.py                                  # 5,000, 250 active, 5 minutes
    .venv/bin/python bench/asleep.py --databases 500 --active 25 --minutes 2

Made through the API on the default settings, with DBPROV_IDLE_STOP (90 s)
for all: the active ones get a connection and a query every minute (as a
preview environment that someone looks at), so they stay awake; the rest
sleep. Most of the active ones slept since they were made, so their first
queries wake them all at once: that is reported on its own. Once all of
them are awake, the rest asleep, and a minute has passed, for ``--minutes``,
every 15 s: the machine's memory in use, the service's and the engine's
memory, the service's descriptors, and how long the list, ``/metrics`` and
a reconcile pass take; and whether every active database answered. A pass
is timed in this process, on the same store and engine, once the service
has stopped (it would be the only reconciler).

Needs the Docker engine and the postgres:17 image; with the btrfs pool (the
service's default as root), each database's data is a thin copy.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import psycopg
from run import Service, pct, sweep, table

MIB = 2**20


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def disk_used(path: str = "/var/lib/dbprov/pool") -> int:
    """Bytes used on the storage pool (0 without one)."""
    if not os.path.isdir(path):
        return 0
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree(root: int) -> list[int]:
    """``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pids_of(name: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (p / "comm").exists() and (p / "comm").read_text().strip() == name]


def timed(service: Service, path: str) -> float:
    started = time.perf_counter()
    status, _ = service.request("GET", path)
    assert status == 200, path
    return time.perf_counter() - started


def create_all(service: Service, count: int) -> tuple[list[dict], list[str]]:
    """``count`` creates, 8 at a time: the ones made, and why the others were not
    (a create that fails is a figure of the run, not its end)."""
    made: list[dict] = []
    failed: list[str] = []
    started = time.monotonic()

    def one(_) -> None:
        status, body = service.request("POST", "/databases", {})
        if status != 201:
            failed.append(f"{status}: {body.get('detail', body)}")
            return
        made.append(body)
        if len(made) % 250 == 0:
            rate = len(made) / (time.monotonic() - started)
            print(f"  {len(made)} made, {rate:.1f}/s; {len(failed)} failed", flush=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(count)))
    return made, failed


class Activity(threading.Thread):
    """Each active database: a connection and a query once a minute, spread over the minute."""

    def __init__(self, databases: list[dict]) -> None:
        super().__init__(daemon=True)
        self.databases = databases
        self.halt = threading.Event()
        self.ok = self.failed = 0
        self.seconds: list[float] = []
        self.errors: list[str] = []
        self.counting = threading.Lock()

    def one(self, database: dict) -> None:
        started = time.perf_counter()
        try:
            with psycopg.connect(database["connection_uri"], connect_timeout=60) as conn:
                conn.execute("SELECT count(*) FROM pg_class").fetchone()
            with self.counting:
                self.seconds.append(time.perf_counter() - started)
                self.ok += 1
        except psycopg.Error as exc:
            with self.counting:
                self.failed += 1
                self.errors.append(str(exc).splitlines()[0])

    def run(self) -> None:
        offsets = {d["id"]: random.uniform(0, 60) for d in self.databases}
        # A worker for each, as each has a user of its own: with fewer, a slow
        # connect delays the next ones past their minute, until they sleep.
        with ThreadPoolExecutor(max_workers=max(1, len(self.databases))) as pool:
            minute = time.monotonic()
            while not self.halt.is_set():
                for database in sorted(self.databases, key=lambda d: offsets[d["id"]]):
                    due = minute + offsets[database["id"]]
                    while time.monotonic() < due and not self.halt.is_set():
                        time.sleep(min(0.2, due - time.monotonic()))
                    if self.halt.is_set():
                        return
                    pool.submit(self.one, database)
                minute += 60


def count(service: Service, status: str) -> int:
    return service.request("GET", f"/databases?status={status}&page_size=1")[1]["total"]


def time_passes(env: dict[str, str], runs: int = 3) -> list[float]:
    """Reconcile passes over the same store and engine, in this process."""
    from service.composition import Services
    from service.settings import Settings

    services = Services.build(Settings.from_env(env))
    reconciler = services.reconciler()
    try:
        reconciler.run_once(wait=True)  # the first holds the sleeping ports again
        passes = []
        for _ in range(runs):
            started = time.perf_counter()
            reconciler.run_once(wait=True)
            passes.append(time.perf_counter() - started)
        return passes
    finally:
        reconciler.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--databases", type=int, default=5000)
    parser.add_argument("--active", type=int, default=250)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--idle-stop", type=int, default=90)
    args = parser.parse_args()
    client = docker.from_env()
    dockerd = pids_of("dockerd")
    before = {"used": meminfo("MemTotal") - meminfo("MemAvailable"),
              "dockerd": sum(map(rss, dockerd)), "containerd": sum(map(rss, pids_of("containerd"))),
              "disk": disk_used()}
    service = Service({
        "DBPROV_IDLE_STOP": str(args.idle_stop),
        "DBPROV_PORT_RANGE": f"20000-{20000 + args.databases + 99}",
        "DBPROV_TENANT_QUOTA": str(args.databases + 10),
    }).start()
    try:
        started = time.monotonic()
        made, failed = create_all(service, args.databases)
        made_in = time.monotonic() - started
        print(f"{len(made)} made in {made_in:.0f} s; {len(failed)} failed", flush=True)
        for reason in failed[:5]:
            print("  failed:", reason.splitlines()[0])
        activity = Activity(random.sample(made, args.active))
        activity.start()
        # The active ones were made up to an hour ago, and most have slept
        # since: their first queries wake them all within a minute. That is
        # reported on its own; the steady state is measured once every active
        # one is awake, the rest asleep, and a minute more has gone by.
        settling = time.monotonic()
        deadline = settling + args.idle_stop + 600
        while time.monotonic() < deadline and (
            count(service, "ready") < args.active or count(service, "sleeping") < len(made) - args.active
        ):
            time.sleep(5)
        time.sleep(60)
        with activity.counting:
            settled = {"seconds": time.monotonic() - settling, "ok": activity.ok, "failed": activity.failed,
                       "errors": activity.errors[:]}
            activity.ok = activity.failed = 0
            activity.seconds.clear()
            activity.errors.clear()
        print(f"settled in {settled['seconds']:.0f} s: {count(service, 'sleeping')} sleeping, "
              f"{count(service, 'ready')} ready", flush=True)
        samples = []
        window = time.monotonic() + args.minutes * 60
        while time.monotonic() < window:
            pids = tree(service.process.pid)
            samples.append({
                "used": meminfo("MemTotal") - meminfo("MemAvailable"),
                "service": sum(map(rss, pids)),
                "fds": sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids),
                "dockerd": sum(map(rss, dockerd)),
                "containerd": sum(map(rss, pids_of("containerd"))),
                "list": timed(service, "/databases?page_size=100"),
                "metrics": timed(service, "/metrics"),
                "load": os.getloadavg()[0],
            })
            time.sleep(15)
        activity.halt.set()
        disk = disk_used() - before["disk"]
        awake = count(service, "ready")
        sleeping = count(service, "sleeping")
        service.stop()
        passes = time_passes(service.env)

        def mean(key: str) -> float:
            return statistics.mean(s[key] for s in samples)

        table(
            f"{args.databases} databases, {args.active} active (a connection and a query a minute), "
            f"the rest asleep; means over {len(samples)} samples",
            ["figure", "value"],
            [
                ["made (s; per second); failed", f"{made_in:.0f}; {len(made) / made_in:.1f}; {len(failed)}"],
                ["ready / sleeping at the end", f"{awake} / {sleeping}"],
                ["while the active ones woke (s): queries ok / failed",
                 f"{settled['seconds']:.0f}: {settled['ok']} / {settled['failed']}"],
                ["then, active queries ok / failed", f"{activity.ok} / {activity.failed}"],
                ["active connect + query p50 / p99 (ms)",
                 f"{pct(activity.seconds, 50) * 1000:.0f} / {pct(activity.seconds, 99) * 1000:.0f}"
                 if activity.seconds else "-"],
                ["machine memory in use, over before (GiB)", f"{(mean('used') - before['used']) / 2**30:.2f}"],
                ["the service's memory (MiB), descriptors", f"{mean('service') / MIB:.0f}, {mean('fds'):.0f}"],
                ["dockerd memory, over before (MiB)", f"{(mean('dockerd') - before['dockerd']) / MIB:.0f}"],
                ["containerd memory, over before (MiB)",
                 f"{(mean('containerd') - before['containerd']) / MIB:.0f}"],
                ["load average (1 min)", f"{mean('load'):.2f}"],
                ["storage pool disk used, over before (GiB; MiB each)",
                 f"{disk / 2**30:.2f}; {disk / MIB / args.databases:.1f}"],
                ["GET /databases?page_size=100 p50 (ms)", f"{pct([s['list'] for s in samples], 50) * 1000:.0f}"],
                ["GET /metrics p50 (ms)", f"{pct([s['metrics'] for s in samples], 50) * 1000:.0f}"],
                ["reconcile pass p50 (ms)", f"{statistics.median(passes) * 1000:.0f}"],
            ],
        )
        for phase, errors in (("while they woke", settled["errors"]), ("then", activity.errors)):
            if errors:
                print(f"first errors {phase}:", *errors[:5], sep="\n  ")
        service.start()
        started = time.monotonic()
        service.delete_all()
        print(f"deleted in {time.monotonic() - started:.0f} s")
    finally:
        service.stop()
        sweep(client)


if __name__ == "__main__":
    main()
