"""How gunicorn serves the API: the settings and server hooks shared by
gunicorn.conf.py (a deployment) and ``dbprov serve``.

``create_app()`` starts nothing. Each worker starts its background work (see
``service.process``) in ``post_worker_init``, after the fork, so the threads
live in the worker, and stops it in ``worker_exit``.

The hooks import what they need when they run: the workers inherit whatever
the master imported, so a master holding the service's modules would hand old
code to the workers a HUP starts, and prometheus_client decides at import
whether values go to PROMETHEUS_MULTIPROC_DIR, which ``on_starting`` sets.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def settings(
    *,
    bind: str,
    workers: int,
    threads: int,
    migrate: bool,
    reconcile: bool,
    multiprocess_metrics: bool,
) -> dict:
    """gunicorn's settings and hooks; ``migrate`` and ``reconcile``: what each worker runs beside the API."""

    def post_worker_init(worker) -> None:
        from .process import Background

        services = worker.wsgi.extensions["dbprov"]
        worker.dbprov_background = Background(
            services, migrate=migrate, reconcile=reconcile
        ).start()
        # What is loaded by now lives as long as the worker: a full collection
        # need not walk it again and again. With it, one took about 50 ms (a
        # stall every request in the worker waited out); without, under 1 ms.
        gc.freeze()

    hooks = {"post_worker_init": post_worker_init, "worker_exit": _worker_exit}
    if multiprocess_metrics:
        # /metrics then sums the request figures of every worker (see service.metrics).
        hooks |= {
            "on_starting": _make_metrics_dir,
            "child_exit": _child_exit,
            "on_exit": _remove_metrics_dir,
        }
    return {
        "bind": bind,
        "workers": workers,
        # A create waits, mostly idle, until its database is ready: threads let
        # one worker hold many such waits while still answering quick reads. The
        # waits block in psycopg and socket calls, which gthread needs no patching for.
        "worker_class": "gthread",
        "threads": threads,
        # Longer than DBPROV_REQUEST_TIMEOUT (90 s by default), so a SIGTERM lets
        # waiting creates answer instead of cutting them off.
        "graceful_timeout": 100,
        "timeout": 120,
        "accesslog": "-",
        # gunicorn's control socket would sit at one path in the home folder for
        # every instance; dbprov does not use it.
        "control_socket_disable": True,
        **hooks,
    }


def _worker_exit(_server, worker) -> None:
    # Also called in the master for a worker that is already gone, and after a
    # worker failed to load the app: neither started anything.
    background = getattr(worker, "dbprov_background", None)
    if background is not None:
        background.stop()


def _make_metrics_dir(server) -> None:
    """In the master, before any worker: the folder where workers count requests."""
    given = os.environ.get(MULTIPROC_DIR)
    if given:
        # An earlier run's files would be counted again.
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        return
    server.dbprov_metrics_dir = tempfile.mkdtemp(prefix="dbprov-metrics-")
    os.environ[MULTIPROC_DIR] = server.dbprov_metrics_dir


def _child_exit(_server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _remove_metrics_dir(server) -> None:
    made = getattr(server, "dbprov_metrics_dir", None)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
