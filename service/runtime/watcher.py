"""Which of an installation's servers run unbroken, followed from a Docker engine's events."""

from __future__ import annotations

import logging
import threading
import time
import weakref

import docker
import docker.errors
import requests.exceptions

from .engine import LABEL_JOB, Engine
from .protocol import LABEL_DATABASE_ID, LABEL_INSTANCE

log = logging.getLogger(__name__)

# Seconds a subscription to the engine's events is trusted before it is made anew.
_EVENTS_RESUBSCRIBE = 60.0


class Liveness:
    """Which of the installation's servers run, followed from the engine's events.

    Started by the first question, on a thread of its own: it subscribes to
    the containers' start, die and destroy events, then lists the containers,
    then applies each event as it comes (all events since the subscription, in
    order, so the listing cannot hide one). It subscribes again every minute,
    so a stream that hangs without an error is trusted for a minute at most;
    while it is not subscribed, it does not know.
    """

    def __init__(self, engine: Engine, instance: str) -> None:
        # Weak: an engine that is dropped with its runtime (tests make many) ends the thread.
        self._engine = weakref.ref(engine)
        self._filters = {"label": [f"{LABEL_INSTANCE}={instance}"]}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running: dict[str, bool] = {}
        # Died since they were first seen running: a crash, even one the
        # restart policy recovered from, is reason enough not to trust it.
        self._died: set[str] = set()
        self._fresh_until = 0.0

    def runs_unbroken(self, database_id: str) -> bool | None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._follow, name="dbprov-engine-events", daemon=True)
                self._thread.start()
            if time.monotonic() > self._fresh_until:
                return None
            if database_id in self._died:
                return False
            return self._running.get(database_id)

    def _follow(self) -> None:
        while True:
            engine = self._engine()
            if engine is None:
                return
            try:
                self._subscribe(engine.client)
            except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
                log.debug("engine events interrupted: %s", exc)
                time.sleep(1.0)
            finally:
                with self._lock:
                    self._fresh_until = 0.0
            del engine

    def _subscribe(self, client: "docker.DockerClient") -> None:
        stream = client.api.events(
            decode=True, filters={**self._filters, "type": "container", "event": ["start", "die", "destroy"]}
        )
        closer = threading.Timer(_EVENTS_RESUBSCRIBE, stream.close)
        closer.daemon = True
        closer.start()
        try:
            listed = client.api.containers(all=True, filters=self._filters)
            with self._lock:
                self._running = {
                    labels[LABEL_DATABASE_ID]: item.get("State") == "running"
                    for item in listed
                    if LABEL_DATABASE_ID in (labels := item.get("Labels") or {}) and LABEL_JOB not in labels
                }
                self._died &= set(self._running)
                self._fresh_until = time.monotonic() + _EVENTS_RESUBSCRIBE
            for event in stream:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                database_id = attributes.get(LABEL_DATABASE_ID)
                if database_id is None or LABEL_JOB in attributes:
                    continue
                action = event.get("Action")
                with self._lock:
                    if action == "start":
                        self._running[database_id] = True
                    elif action == "die":
                        self._running[database_id] = False
                        self._died.add(database_id)
                    else:  # destroy: a server made anew under this id starts afresh
                        self._running.pop(database_id, None)
                        self._died.discard(database_id)
        finally:
            closer.cancel()
            stream.close()
