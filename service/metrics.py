"""/metrics in the Prometheus text format.

Everything about databases is read from the metadata store at scrape time, so
every API process reports the same figures whichever one is scraped. HTTP
request durations are the answering process's own (one series set per
process: scrape each gunicorn worker's, or run one).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from flask import Flask, Response, g, request
from sqlalchemy import func, select

from .models import Database, Status
from .store import Store
from .tenancy import POOL_TENANT

PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


class Histogram:
    """Cumulative buckets per label set, as Prometheus expects them."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self._series: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def observe(self, labels: tuple, value: float) -> None:
        with self._lock:
            counts = self._series.setdefault(labels, [[0] * len(self.buckets), 0, 0.0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[0][i] += 1
            counts[1] += 1
            counts[2] += value

    def render(self, name: str, label_names: tuple[str, ...]) -> list[str]:
        lines = []
        with self._lock:
            series = sorted(self._series.items())
        for labels, (buckets, count, total) in series:
            base = ",".join(f'{k}="{v}"' for k, v in zip(label_names, labels))
            sep = "," if base else ""
            for bound, bucket_count in zip(self.buckets, buckets):
                lines.append(f'{name}_bucket{{{base}{sep}le="{bound:g}"}} {bucket_count}')
            lines.append(f'{name}_bucket{{{base}{sep}le="+Inf"}} {count}')
            lines.append(f"{name}_count{{{base}}} {count}")
            lines.append(f"{name}_sum{{{base}}} {total:.6f}")
        return lines


class Metrics:
    def __init__(self, store: Store, port_range: tuple[int, int]) -> None:
        self.store = store
        self.port_range = port_range
        self.http = Histogram(HTTP_BUCKETS)

    def init_app(self, app: Flask) -> None:
        @app.before_request
        def _start_timer() -> None:
            g.metrics_started = time.perf_counter()

        @app.after_request
        def _observe(response: Response) -> Response:
            started = g.pop("metrics_started", None)
            if started is not None:
                # The route pattern, not the path: ids would make a series each.
                route = request.url_rule.rule if request.url_rule else "unmatched"
                self.http.observe(
                    (request.method, route, str(response.status_code)),
                    time.perf_counter() - started,
                )
            return response

        @app.get("/metrics")
        def metrics() -> Response:
            return Response(self.render(), mimetype="text/plain; version=0.0.4")

    def render(self) -> str:
        with self.store.read() as session:
            by_status = session.execute(
                select(Database.tenant, Database.version, Database.status, func.count())
                .group_by(Database.tenant, Database.version, Database.status)
            ).all()
            ports_in_use = session.scalar(
                select(func.count()).select_from(Database).where(Database.host_port.is_not(None))
            )
            timings = session.scalars(
                select(Database.phase_timings).where(Database.ready_at.is_not(None))
            ).all()

        lines = [
            "# HELP dbprov_databases Tenant databases by status.",
            "# TYPE dbprov_databases gauge",
        ]
        statuses: dict[str, int] = defaultdict(int)
        pool: dict[tuple[str, str], int] = defaultdict(int)
        for tenant, version, status, count in by_status:
            if tenant == POOL_TENANT:
                pool[(version, status.value)] += count
            else:
                statuses[status.value] += count
        lines += [f'dbprov_databases{{status="{s.value}"}} {statuses[s.value]}' for s in Status]

        lines += [
            "# HELP dbprov_pool_servers Warm pool members by version and status.",
            "# TYPE dbprov_pool_servers gauge",
        ]
        lines += [f'dbprov_pool_servers{{version="{v}",status="{s}"}} {n}' for (v, s), n in sorted(pool.items())]

        phases = Histogram(PHASE_BUCKETS)
        claims = 0
        for record in timings:
            claims += "claim" in (record or {})
            for phase, seconds in (record or {}).items():
                phases.observe((phase,), seconds)
        lines += [
            "# HELP dbprov_pool_claims_total Databases handed out from the warm pool.",
            "# TYPE dbprov_pool_claims_total counter",
            f"dbprov_pool_claims_total {claims}",
            "# HELP dbprov_provisioning_phase_seconds Time each provisioning phase took.",
            "# TYPE dbprov_provisioning_phase_seconds histogram",
            *phases.render("dbprov_provisioning_phase_seconds", ("phase",)),
        ]

        first, last = self.port_range
        lines += [
            "# HELP dbprov_ports_in_use Host ports of the range held by databases.",
            "# TYPE dbprov_ports_in_use gauge",
            f"dbprov_ports_in_use {ports_in_use or 0}",
            "# HELP dbprov_ports_total Host ports in DBPROV_PORT_RANGE.",
            "# TYPE dbprov_ports_total gauge",
            f"dbprov_ports_total {last - first + 1}",
            "# HELP dbprov_http_request_duration_seconds HTTP request durations in this process.",
            "# TYPE dbprov_http_request_duration_seconds histogram",
            *self.http.render("dbprov_http_request_duration_seconds", ("method", "route", "status")),
        ]
        return "\n".join(lines) + "\n"
