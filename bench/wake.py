"""Scale to zero: how long a sleeping database takes to answer its first
connection, against a floor measured in the same run.

    .venv/bin/python bench/wake.py              # 7 runs
    .venv/bin/python bench/wake.py --runs 15 --listeners 5000

Per run:
- the floor: a plain ``docker run`` of the same image, stopped, then
  ``docker start`` to its first SELECT 1 (what any wake has to wait for);
- a dbprov database asleep (idle_stop 1 s): a psycopg connect with its URI,
  unchanged, to its first SELECT 1; then, asleep again, 5 clients at once
  (first and last to answer);
- apart, in 3 more wakes, a probe connects every 5 ms: the connections the
  port refused in the gap between the listener letting go and the engine
  publishing it;
- and in 3 falls asleep, a probe takes the first step of a login every
  20 ms (never authenticated, so it is no session): the ones told that the
  server shuts down (57P03) or refused, between the last count of clients and
  the listener holding the port.
Then the listeners' own cost: descriptors and memory for ``--listeners``
sleeping databases, in this process.

Needs the Docker engine and the postgres:17 image.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import docker
import psycopg
from run import Service, free_port, pct, plain_server, sweep, table, wait_select1

from service.reconciler.wake import Sleepers


def start_floor(client: docker.DockerClient) -> float:
    """docker start of a stopped plain server -> its first SELECT 1."""
    with plain_server(client) as (container, uri):
        container.stop()
        started = time.perf_counter()
        container.start()
        wait_select1(uri)
        return time.perf_counter() - started


def asleep(service: Service, database: dict, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while service.request("GET", f"/databases/{database['id']}")[1]["status"] != "sleeping":
        if time.monotonic() > deadline:
            raise RuntimeError(f"database {database['id']} did not sleep")
        time.sleep(0.1)
    # Held by the listener: a connection is answered (and wakes it), not refused.
    time.sleep(0.5)


class Probe(threading.Thread):
    """Connects to a port every 5 ms, counting refusals, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.refused, self.tries = port, 0, 0
        self.first: float | None = None
        self.last: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with socket.socket() as probe:
                self.tries += 1
                if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                    now = time.perf_counter()
                    self.refused += 1
                    self.first = self.first or now
                    self.last = now
            time.sleep(0.005)


def login_step(port: int) -> str:
    """What the port answers to a login's startup packet: "asked" (for a
    password), the error's SQLSTATE, "refused" or "closed"."""
    startup = b"user\0dbprov_probe\0database\0postgres\0\0"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(struct.pack("!ii", 8 + len(startup), 196608) + startup)
            reply = sock.recv(4096)
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "closed"
    if reply[:1] == b"R":
        return "asked"
    if reply[:1] == b"E":
        return next((f[1:].decode() for f in reply[5:].split(b"\0") if f[:1] == b"C"), "error")
    return "closed"


def fall(service: Service, database: dict) -> tuple[dict[str, int], float]:
    """The database, woken, falls asleep under a login probe every 20 ms: the
    probe's answers until it slept (one that came once the port was held
    woke it again, and is answered), and how long those not "asked" spanned (s)."""
    wait_select1(database["connection_uri"])
    path = f"/databases/{database['id']}"
    while service.request("GET", path)[1]["status"] != "ready":
        time.sleep(0.05)
    since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def slept() -> bool:
        items = service.request("GET", f"{path}/events?since={since}")[1]["items"]
        return any(event["kind"] == "slept" for event in items)

    answers: list[tuple[float, str]] = []
    deadline = time.monotonic() + 120
    while not slept() and time.monotonic() < deadline:
        answers.append((time.perf_counter(), login_step(database["port"])))
        time.sleep(0.02)
    missed = [at for at, answer in answers if answer != "asked"]
    counts: dict[str, int] = {}
    for _, answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return counts, (missed[-1] - missed[0]) if missed else 0.0


def first_select(uri: str, results: list, i: int, barrier: threading.Barrier) -> None:
    barrier.wait()
    started = time.perf_counter()
    with psycopg.connect(uri, connect_timeout=120) as conn:
        conn.execute("SELECT 1").fetchone()
    results[i] = time.perf_counter() - started


def wake_once(service: Service, database: dict, clients: int, probed: bool = False) -> tuple[list[float], Probe]:
    asleep(service, database)
    probe = Probe(database["port"])
    results: list = [None] * clients
    barrier = threading.Barrier(clients)
    threads = [threading.Thread(target=first_select, args=(database["connection_uri"], results, i, barrier))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    if probed:
        time.sleep(0.005)  # the clients' connections first, then the probe's
        probe.start()
    for thread in threads:
        thread.join(180)
    if probed:
        probe.halt.set()
        probe.join()
    return sorted(results), probe


def listener_cost(count: int) -> tuple[int, float]:
    """Descriptors and MiB of memory ``count`` held ports cost this process."""
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    sleepers = Sleepers(lambda _: None)
    fds, memory = len(os.listdir("/proc/self/fd")), rss()
    held = 0
    try:
        for i in range(count):
            held += sleepers.hold(f"db{i}", "127.0.0.1", free_port())
        return len(os.listdir("/proc/self/fd")) - fds, (rss() - memory) / held / 1024
    finally:
        sleepers.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--listeners", type=int, default=2000)
    args = parser.parse_args()
    client = docker.from_env()
    service = Service({"DBPROV_RECONCILE_INTERVAL": "0.5"}).start()
    try:
        status, one = service.request("POST", "/databases", {"idle_stop": 1})
        assert status == 201, one
        status, five = service.request("POST", "/databases", {"idle_stop": 1})
        assert status == 201, five
        wait_select1(one["connection_uri"])
        wait_select1(five["connection_uri"])
        floors, singles, firsts, lasts, refused, tries, gaps = [], [], [], [], 0, 0, []
        for _ in range(args.runs):
            floors.append(start_floor(client))
            singles.append(wake_once(service, one, 1)[0][0])
            times, _ = wake_once(service, five, 5)
            firsts.append(times[0])
            lasts.append(times[-1])
        # Apart: the probe's stream of connections slows the server's start.
        for _ in range(3):
            probe = wake_once(service, one, 1, probed=True)[1]
            refused, tries = refused + probe.refused, tries + probe.tries
            if probe.first is not None:
                gaps.append(probe.last - probe.first)
        floor = pct(floors, 50)
        table(
            f"wake, p50 of {args.runs} runs (floor: docker start of a stopped plain server to SELECT 1)",
            ["what", "p50 s", "max s", "x floor"],
            [
                ["floor", f"{floor:.3f}", f"{max(floors):.3f}", "1.00"],
                ["1 client: connect -> SELECT 1", f"{pct(singles, 50):.3f}", f"{max(singles):.3f}",
                 f"{pct(singles, 50) / floor:.2f}"],
                ["5 at once: first", f"{pct(firsts, 50):.3f}", f"{max(firsts):.3f}",
                 f"{pct(firsts, 50) / floor:.2f}"],
                ["5 at once: last", f"{pct(lasts, 50):.3f}", f"{max(lasts):.3f}",
                 f"{pct(lasts, 50) / floor:.2f}"],
            ],
        )
        gap = f"{pct(gaps, 50) * 1000:.0f} ms p50, {max(gaps) * 1000:.0f} ms max" if gaps else "none seen"
        print(f"probe connections refused during 3 wakes: {refused} of {tries}; refused window: {gap}")
        for _ in range(3):
            asleep(service, one)
            counts, span = fall(service, one)
            print(f"a fall asleep under a login probe every 20 ms: {counts}; not asked for {span * 1000:.0f} ms")
        fds, kib = listener_cost(args.listeners)
        print(f"{args.listeners} sleeping databases' listeners: {fds} descriptors, {kib:.1f} KiB of memory each")
    finally:
        service.delete_all()
        service.stop()
        sweep(client)


if __name__ == "__main__":
    main()
