"""/metrics in the Prometheus exposition format, with prometheus_client.

Everything about databases is read from the metadata store at scrape time, so
every API process reports the same figures whichever one is scraped. HTTP
request durations are counted where the request is served; under gunicorn
(PROMETHEUS_MULTIPROC_DIR set, see ``service.web``) each worker writes them to
a file in that folder and a scrape sums them over every worker.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Callable, Iterator

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from ..domain.models import PHASE_BUCKETS, Database, PhaseHistogram, Status
from ..domain.tenancy import POOL_TENANT
from ..runtime.protocol import StorageReport
from ..store.engine import Store

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


class StoreFigures(Collector):
    """Databases, warm pool, provisioning phases and ports, read from the store at each scrape."""

    def __init__(self, store: Store, port_range: tuple[int, int]) -> None:
        self.store = store
        self.port_range = port_range

    def collect(self) -> Iterator[Metric]:
        with self.store.read() as session:
            by_status = session.execute(
                select(Database.tenant, Database.version, Database.status, func.count())
                .group_by(Database.tenant, Database.version, Database.status)
            ).all()
            ports_in_use = session.scalar(
                select(func.count()).select_from(Database).where(Database.host_port.is_not(None))
            )
            histogram = session.execute(
                select(PhaseHistogram.phase, PhaseHistogram.bucket, PhaseHistogram.count, PhaseHistogram.seconds)
                .order_by(PhaseHistogram.phase, PhaseHistogram.bucket)
            ).all()

        statuses: dict[str, int] = defaultdict(int)
        pool: dict[tuple[str, str], int] = defaultdict(int)
        for tenant, version, status, count in by_status:
            if tenant == POOL_TENANT:
                pool[(version, status.value)] += count
            else:
                statuses[status.value] += count
        databases = GaugeMetricFamily(
            "dbprov_databases", "Tenant databases by status.", labels=["status"]
        )
        for status in Status:
            databases.add_metric([status.value], statuses[status.value])
        yield databases
        servers = GaugeMetricFamily(
            "dbprov_pool_servers", "Warm pool members by version and status.",
            labels=["version", "status"],
        )
        for (version, status), count in sorted(pool.items()):
            servers.add_metric([version, status], count)
        yield servers

        counts: dict[str, list[tuple[str, int]]] = defaultdict(list)
        sums: dict[str, float] = {}
        for phase, bucket, count, seconds in histogram:
            bound = floatToGoString(PHASE_BUCKETS[bucket]) if bucket < len(PHASE_BUCKETS) else "+Inf"
            counts[phase].append((bound, count))
            sums[phase] = seconds  # the last, +Inf, row's: every observation
        # Every plain claim, and every claim that set up more, has a claim phase.
        claims = dict(counts.get("claim", [])).get("+Inf", 0)
        yield CounterMetricFamily(
            "dbprov_pool_claims", "Databases handed out from the warm pool.", value=claims
        )
        # Their latency is the "wake" phase below: from the first connection to ready.
        yield CounterMetricFamily(
            "dbprov_wakes", "Sleeping databases woken, by a connection or a start.",
            value=dict(counts.get("wake", [])).get("+Inf", 0),
        )
        phases = HistogramMetricFamily(
            "dbprov_provisioning_phase_seconds", "Time each provisioning phase took.",
            labels=["phase"],
        )
        for phase, buckets in sorted(counts.items()):
            if buckets[-1][1]:
                phases.add_metric([phase], buckets, sums[phase])
        yield phases

        first, last = self.port_range
        yield GaugeMetricFamily(
            "dbprov_ports_in_use", "Host ports of the range held by databases.",
            value=ports_in_use or 0,
        )
        yield GaugeMetricFamily(
            "dbprov_ports_total", "Host ports in DBPROV_PORT_RANGE.", value=last - first + 1
        )


class StorageFigures(Collector):
    """The storage backend, and a pool's room, asked at each scrape."""

    def __init__(self, report: Callable[[], StorageReport]) -> None:
        self.report = report

    def collect(self) -> Iterator[Metric]:
        report = self.report()
        backend = GaugeMetricFamily(
            "dbprov_storage_backend", "The storage backend in use (btrfs or copy).", labels=["backend"]
        )
        backend.add_metric([report.backend], 1)
        yield backend
        if report.free_bytes is not None:
            yield GaugeMetricFamily(
                "dbprov_storage_pool_free_bytes",
                "Bytes the storage pool can still take, the disk under its loop file counted.",
                value=report.free_bytes,
            )
            yield GaugeMetricFamily(
                "dbprov_storage_pool_size_bytes", "The storage pool's size.", value=report.size_bytes
            )


class Metrics:
    """Times every request and serves ``/metrics`` (no token needed)."""

    def __init__(
        self, store: Store, port_range: tuple[int, int], storage: Callable[[], StorageReport]
    ) -> None:
        # A registry per app, not prometheus_client's global one: tests build many apps.
        self.registry = CollectorRegistry()
        self.registry.register(StoreFigures(store, port_range))
        self.registry.register(StorageFigures(storage))
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            # Request durations go to this process's file; a scrape reads every worker's.
            MultiProcessCollector(self.registry)
            http_registry = None
        else:
            http_registry = self.registry
        self.http = Histogram(
            "dbprov_http_request_duration_seconds", "HTTP request durations.",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=http_registry,
        )

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
                self.http.labels(request.method, route, str(response.status_code)).observe(
                    time.perf_counter() - started
                )
            return response

        @app.get("/metrics")
        def metrics() -> Response:
            # The text format, or OpenMetrics when the scraper asks for it.
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            return Response(encoder(self.registry), content_type=content_type)
