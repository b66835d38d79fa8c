"""Where a warm pool claim's time goes, against the floor of one psycopg
connect to a server that already runs, measured in the same run.

    .venv/bin/python bench/claim.py            # 31 claims

Per claim (the pool refilled before each): the HTTP request (a create that
a warm member answers), of which the server's own transaction
(``phase_timings.claim``); then the client's first connect with the returned
URI (SCRAM, and TLS where the URI's sslmode=prefer finds it) and its SELECT 1.
The floor: a connect and a SELECT 1 to the same kind of server, running and
already connected to once: the same URI, a second time. And for reference, a
plain ``docker run`` server without TLS.

Needs the Docker engine and the postgres:17 image.
"""

from __future__ import annotations

import argparse
import time

import docker
import psycopg
from run import Service, pct, plain_server, sweep, table, wait_for_warm


def connect_once(uri: str) -> float:
    started = time.perf_counter()
    with psycopg.connect(uri) as conn:
        conn.execute("SELECT 1").fetchone()
    return time.perf_counter() - started


def plain_floor(client: docker.DockerClient, runs: int) -> list[float]:
    with plain_server(client) as (_, uri):
        connect_once(uri)
        return [connect_once(uri) for _ in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=31)
    args = parser.parse_args()
    client = docker.from_env()
    service = Service({"DBPROV_POOL_SIZE": "2"}).start()
    try:
        http, transaction, first, floor, total = [], [], [], [], []
        for _ in range(args.runs):
            wait_for_warm(service, 2)
            time.sleep(0.5)  # the refill's own work settled
            started = time.perf_counter()
            status, body = service.request("POST", "/databases", {})
            answered = time.perf_counter()
            assert status == 201 and "claim" in body["phase_timings"], body
            with psycopg.connect(body["connection_uri"]) as conn:
                conn.execute("SELECT 1").fetchone()
            done = time.perf_counter()
            http.append(answered - started)
            transaction.append(body["phase_timings"]["claim"])
            first.append(done - answered)
            total.append(done - started)
            floor.append(connect_once(body["connection_uri"]))
            service.request("DELETE", f"/databases/{body['id']}")
        plain = plain_floor(client, args.runs)
        base = pct(floor, 50)
        table(
            f"pool claim, request to first SELECT 1 (p50 of {args.runs}); floor: a connect and SELECT 1 "
            "to a running server, the same URI a second time",
            ["part", "p50 ms", "p95 ms", "x floor"],
            [[name, f"{pct(values, 50) * 1000:.1f}", f"{pct(values, 95) * 1000:.1f}",
              f"{pct(values, 50) / base:.2f}"]
             for name, values in (
                 ("floor: connect + SELECT 1, running server", floor),
                 ("plain docker run server, no TLS", plain),
                 ("claim: HTTP request", http),
                 ("  of which the service's transaction", transaction),
                 ("claim: first connect + SELECT 1", first),
                 ("claim: total", total),
             )],
        )
    finally:
        service.delete_all()
        service.stop()
        sweep(client)


if __name__ == "__main__":
    main()
