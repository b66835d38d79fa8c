"""What runs beside the API, or as a process of its own: migrations, the
reconciler and the change feed, started in the background so the API answers
(and /readyz says 503) while the metadata store is still coming up."""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from pathlib import Path

from .composition import Services
from .store.coordination import ChangeListener, ReconcilerBusy, single_reconciler

log = logging.getLogger(__name__)

# With a change feed, waiting requests are nudged on every change; the re-read
# interval is only a safety net then.
_POLL_WITH_FEED = 2.0
# How often a standby reconciler asks whether the active one has ended.
_STANDBY_RETRY = 5.0


class Background:
    """Started and stopped explicitly, by gunicorn's worker hooks (``web``) or ``dbprov worker``."""

    def __init__(
        self,
        services: Services,
        *,
        migrate: bool,
        reconcile: bool,
        heartbeat: Path | None = None,
    ) -> None:
        self.services = services
        self.migrate = migrate
        self.reconcile = reconcile
        self.heartbeat = heartbeat
        self._stopping = threading.Event()
        self._resources = ExitStack()
        self._thread = threading.Thread(target=self._run, name="dbprov-background", daemon=True)

    def start(self) -> "Background":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._start_parts()
        except Exception:  # noqa: BLE001 - a background thread has nobody else to tell
            log.exception("background start failed")

    def _start_parts(self) -> None:
        services = self.services
        store = services.store
        if self.migrate:
            if not store.upgrade_when_up(services.vault, self._stopping):
                return
            log.info("metadata store is up to date")
        # Each configured version's image, looked up (and pulled if missing) now
        # rather than on the first create that needs it.
        for version, state in services.images.check().items():
            log.info("version %s (%s): %s", version, services.settings.images[version], state)
        storage = services.runtime.storage_report()
        log.info("storage: %s, %s", storage.backend, storage.reason)
        if store.is_postgres:
            listener = ChangeListener(store, services.wanted, services.changed)
            listener.start()
            self._resources.callback(listener.stop)
            services.records.poll_interval = _POLL_WITH_FEED
        if self.reconcile:
            exclusive = services.runtime.publishes_here
            waited = False
            while True:
                try:
                    self._resources.enter_context(single_reconciler(store, services.settings.data_dir, exclusive))
                    break
                except ReconcilerBusy:
                    if not store.is_postgres:
                        raise
                # A standby: it takes over when the active one ends.
                if not waited:
                    log.info("another reconciler is active on this store; this one waits as its standby")
                    waited = True
                if self._stopping.wait(_STANDBY_RETRY):
                    return
            reconciler = services.reconciler(heartbeat=self.heartbeat)
            reconciler.start()
            self._resources.callback(reconciler.stop)
            log.info("reconciler started (instance %s)", services.settings.instance)

    def stop(self) -> None:
        """Stop at a step boundary; whatever is unfinished, the next start resumes."""
        self._stopping.set()
        self._thread.join(timeout=30)
        self._resources.close()
