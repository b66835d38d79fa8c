"""Continuous archiving for point-in-time recovery: archive_command against pg_receivewal.

    .venv/bin/python bench/archive.py                  # 60 s of writes each
    .venv/bin/python bench/archive.py --seconds 30 --runs 2

Plain servers of the image, one after another, under the same writer: a
numbered, timestamped row committed every 20 ms (as a recovery test writes),
each commit's end in the WAL noted. The ways:

- ``none``: no archiving; the baseline for CPU and WAL;
- ``archive_command``: ``archive_mode=on`` with ``archive_timeout=1``, the
  shortest switch that could give a 1 s recovery point; each segment is
  gzipped into a directory. PostgreSQL archives whole segments only;
- ``pg_receivewal``: the WAL streamed into a directory by a second container
  of the same image (in the server's network namespace), over a replication
  slot, flushed as it comes (``--synchronous``); a segment it writes is
  16 MB from its start, as in pg_wal;
- ``pg_receivewal lz4``: the same, compressed as it is written.

Every 100 ms, the recovery point: how old the oldest commit is that is not
yet safe in the archive (0 s when every commit is). Then the archive's size
at the end (a receiver starts with the segment the server is in, which
holds initdb's WAL), the segments switched, and per minute of writing the
WAL written and the CPU of the server's container and of the receiver's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time

import docker
import psycopg
from run import IMAGE, INSTANCE, pct, plain_server, sweep, table

from service.runtime.protocol import LABEL_INSTANCE

SEGMENT = 16 * 2**20
MIB = 2**20
ARCHIVE = "/var/lib/postgresql/archive"  # the postgres user's home: it may write there
ARCHIVE_COMMAND = f"mkdir -p {ARCHIVE} && gzip -1 < %p > {ARCHIVE}/%f.tmp && mv {ARCHIVE}/%f.tmp {ARCHIVE}/%f.gz"


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def segment_end(name: str) -> int:
    """Where a WAL segment named ``name`` ends (16 MB segments)."""
    return (int(name[8:16], 16) << 32) + (int(name[16:24], 16) + 1) * SEGMENT


def cpu_seconds(container) -> float:
    return container.stats(stream=False)["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9


def bytes_in(container, path: str) -> int:
    result = container.exec_run(["du", "-sb", path])
    return int(result.output.split()[0]) if result.exit_code == 0 else 0


class Writer(threading.Thread):
    """A row every 20 ms, each commit's time and the WAL position after it."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.halt = threading.Event()
        self.commits: list[tuple[float, int]] = []

    def run(self) -> None:
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS tick (n int PRIMARY KEY, at timestamptz, pad text)")
            n = 0
            while not self.halt.is_set():
                n += 1
                conn.execute("INSERT INTO tick VALUES (%s, clock_timestamp(), repeat('x', 200))", (n,))
                after = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
                self.commits.append((time.time(), lsn(after)))
                self.halt.wait(0.02)


def streamed(conn: psycopg.Connection) -> int:
    """The WAL position up to which the receiver has flushed what it got."""
    row = conn.execute(
        "SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = 'pg_receivewal'"
    ).fetchone()
    return lsn(row[0]) if row and row[0] else 0


def archived_segments(server) -> list[tuple[float, int]]:
    """When each segment landed in archive_command's directory, and where it ends."""
    output = server.exec_run(["sh", "-c", f"stat -c '%n %.Y' {ARCHIVE}/*.gz"]).output.decode()
    return [(float(when), segment_end(path.rsplit("/", 1)[1][:24]))
            for path, when in (line.split() for line in output.splitlines() if line.endswith(tuple("0123456789")))]


def frange(start: float, stop: float, step: float) -> list[float]:
    return [start + i * step for i in range(int((stop - start) / step) + 1)]


def run_one(client: docker.DockerClient, way: str, seconds: float) -> dict:
    command = ["postgres"]
    if way == "archive_command":
        command += ["-c", "archive_mode=on", "-c", "archive_timeout=1", "-c", f"archive_command={ARCHIVE_COMMAND}"]
    with plain_server(client, command) as (server, uri):
        return measure(client, server, uri, way, seconds)


def measure(client: docker.DockerClient, server, uri: str, way: str, seconds: float) -> dict:
    receiver = None
    try:
        if way.startswith("pg_receivewal"):
            compress = " --compress=lz4" if way.endswith("lz4") else ""
            # As the recovery tests would have it: a slot, so the server keeps
            # what the receiver has not had yet; trust on 127.0.0.1, as the image's pg_hba has it.
            receiver = client.containers.run(
                IMAGE, ["sh", "-c",
                        "mkdir -p /archive && pg_receivewal -h 127.0.0.1 -U postgres -S dbprov --create-slot "
                        "--if-not-exists && exec pg_receivewal -h 127.0.0.1 -U postgres -S dbprov -D /archive "
                        f"--synchronous --no-loop{compress}"],
                detach=True, network_mode=f"container:{server.id}", labels={LABEL_INSTANCE: INSTANCE},
            )
        with psycopg.connect(uri, autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while receiver is not None and not streamed(conn):
                if time.monotonic() > deadline:
                    raise RuntimeError(receiver.logs().decode())
                time.sleep(0.1)
            wal_before = lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        cpu_before = cpu_seconds(server), cpu_seconds(receiver) if receiver else 0.0
        writer = Writer(uri)
        writer.start()
        # Where the archive stood, every 100 ms: asked of the server for a
        # receiver; for archive_command, read afterwards from when each
        # segment landed, so that no session of the bench's own is there
        # (while one polled, archive_timeout never switched a segment).
        safe_at: list[tuple[float, int]] = []
        until = time.monotonic() + seconds
        with psycopg.connect(uri, autocommit=True) if receiver else contextlib.nullcontext() as conn:
            while time.monotonic() < until:
                time.sleep(0.1)
                if receiver is not None:
                    safe_at.append((time.time(), streamed(conn)))
        writer.halt.set()
        writer.join()
        minutes = seconds / 60
        cpu_after = cpu_seconds(server), cpu_seconds(receiver) if receiver else 0.0
        with psycopg.connect(uri, autocommit=True) as conn:
            wal_after = lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        wal = wal_after - wal_before
        switches = wal_after // SEGMENT - wal_before // SEGMENT
        if way == "archive_command":
            landed = archived_segments(server)
            safe_at = [(at, max((end for when, end in landed if when <= at), default=0))
                       for at in frange(writer.commits[0][0], writer.commits[-1][0], 0.1)]
        # The oldest commit the archive did not have yet at each instant, if any.
        points = []
        for at, safe in safe_at:
            unsafe = next((when for when, end in writer.commits if end > safe and when <= at), None)
            points.append(at - unsafe if unsafe is not None else 0.0)
        archive = bytes_in(receiver, "/archive") if receiver else bytes_in(server, ARCHIVE)
        return {
            "points": points,
            "commits": len(writer.commits),
            "switches": switches,
            "archive": archive / MIB,
            "wal": wal / MIB / minutes,
            "server_cpu": (cpu_after[0] - cpu_before[0]) / minutes,
            "receiver_cpu": (cpu_after[1] - cpu_before[1]) / minutes,
        }
    finally:
        if receiver is not None:
            receiver.remove(force=True, v=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    client = docker.from_env()
    ways = ["none", "archive_command", "pg_receivewal", "pg_receivewal lz4"]
    results: dict[str, list[dict]] = {way: [] for way in ways}
    try:
        for _ in range(args.runs):
            # Interleaved, so a noisy minute of the machine touches each way alike.
            for way in ways:
                results[way].append(run_one(client, way, args.seconds))
    finally:
        sweep(client)

    def median(way: str, key: str) -> float:
        return statistics.median(r[key] for r in results[way])

    base_cpu = median("none", "server_cpu")
    rows = []
    for way in ways:
        points = [p for r in results[way] for p in r["points"]]
        cpu = median(way, "server_cpu") + median(way, "receiver_cpu")
        rows.append([
            way,
            "-" if way == "none" else
            f"{pct(points, 50):.2f} / {pct(points, 99):.2f} / {max(points):.2f}",
            "-" if way == "none" else f"{median(way, 'archive'):.1f}",
            f"{median(way, 'switches'):.0f}",
            f"{median(way, 'wal'):.1f}",
            f"{cpu:.2f} ({cpu / base_cpu:.2f}x)",
        ])
    table(
        f"a commit every 20 ms for {args.seconds:g} s, {args.runs} run(s) of each way, medians",
        ["way", "recovery point p50 / p99 / max (s)", "archive at the end (MB)", "segments switched",
         "WAL MB/min",
         "CPU s/min, server + receiver (x none)"],
        rows,
    )


if __name__ == "__main__":
    main()
