"""What every step of the reconciler shares: its context, its moves on a record, and what its failure means.

Failures are of two kinds (``errors``): a ``TransientError`` is retried with
exponential backoff and jitter, its attempts kept on the record, until the
retry budget (DBPROV_RETRY_BUDGET) runs out; a ``PermanentError`` fails the
database at once. Either way the reason is in ``last_error``, and nothing is
left behind. Only a bug writes a traceback to the log.

A server whose machine cannot be reached (a Swarm node down) is neither: its
data is there. A ready database on it is ``unavailable`` until the machine is
back, and one being brought up that was ready once waits for it without
spending the budget (``NodeUnavailable``).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta

from ..domain.models import COMING_UP, MEANT_TO_RUN, Database, Status, utcnow
from ..domain.records import Records
from ..errors import (
    DataLost,
    DbprovError,
    NodeUnavailable,
    PermanentError,
    TransientError,
)
from ..postgres.admin import ServerAdmin
from ..runtime.protocol import ServerRuntime
from ..settings import Settings
from ..store.crypto import Vault
from ..store.engine import Store
from .wake import Sleepers

log = logging.getLogger(__name__)

# Backoff of transient failures: 1 s, 2 s, 4 s ... up to a minute, each with jitter.
_BACKOFF_FIRST = 1.0
_BACKOFF_CAP = 60.0

# One step for one database (or snapshot), given its id, run under its claim.
Task = Callable[[str], None]


class Superseded(Exception):
    """The record left the status this step was working for (say, it is being deleted)."""


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failures in a row.

    "Equal jitter": half the exponential step, plus up to the other half at
    random, so that databases that failed together do not retry together.
    """
    step = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2 ** (attempts - 1))
    return step / 2 + random.uniform(0, step / 2)


@dataclass(frozen=True)
class Context:
    """The parts of the service that the steps work with, one set per reconciler."""

    settings: Settings
    store: Store
    runtime: ServerRuntime
    records: Records
    vault: Vault
    server_admin: ServerAdmin
    # Set when the reconciler stops: a step that waits gives up.
    stopping: threading.Event
    # The ports of sleeping databases, where the runtime publishes on this machine.
    sleepers: Sleepers | None = None


class Step:
    """Base of the steps of one concern: the context's common parts, and loading and moving a record."""

    def __init__(self, ctx: Context) -> None:
        self.settings = ctx.settings
        self.store = ctx.store
        self.runtime = ctx.runtime
        self.records = ctx.records
        self.vault = ctx.vault
        self.sleepers = ctx.sleepers

    def _give_back_port(self, database_id: str) -> None:
        """The listener of a database that slept closed, before its server takes the port or lets it go."""
        if self.sleepers is not None:
            self.sleepers.release(database_id)

    def _load(self, database_id: str) -> Database:
        with self.store.read() as session:
            record = session.get(Database, database_id)
        if record is None:
            raise Superseded(database_id)
        return record

    def _transition(self, database_id: str, expected: set[Status], **values) -> Database:
        record = self.records.transition(database_id, expected, **values)
        if record is None:
            raise Superseded(database_id)
        return record


class Outcomes(Step):
    """A step run, and its failure turned into a retry, a failed database or a lost one."""

    def __init__(self, ctx: Context, worked: Collection[Status]) -> None:
        super().__init__(ctx)
        # The statuses that ask for a step: a retry is for a record still in one.
        self._worked = frozenset(worked)

    def run(self, database_id: str, task: Task) -> None:
        """Run one step and decide what its failure means."""
        try:
            try:
                task(database_id)
            except TransientError as exc:
                self._retry_later(database_id, exc.detail, node_away=isinstance(exc, NodeUnavailable))
            except DataLost as exc:
                self._lose(database_id, exc.detail)
            except PermanentError as exc:
                self._fail(database_id, exc.detail)
            except DbprovError as exc:
                # Raised on purpose but not classified: a bug, retried like a transient error.
                log.error("database %s: unclassified error: %s", database_id, exc.detail)
                self._retry_later(database_id, exc.detail)
        except Superseded:
            pass  # the record moved on; the next pass sees what it wants now

    def _retry_later(self, database_id: str, error: str, node_away: bool = False) -> None:
        """Count the attempt and set the next one, or fail once the budget is spent.

        A database that was ready once, waiting for the machine that holds its
        data (``node_away``), spends no budget however long that takes: its
        data is there, and failing it would help nobody. A new one keeps the
        budget, so that a CI job does not wait for ever.
        """
        record = self._load(database_id)
        if record.status not in self._worked:
            return
        if record.status == Status.WAKING and self.sleepers is not None and not node_away:
            self._back_to_sleep(record, error)
            return
        waits = node_away and record.ready_at is not None
        now = utcnow()
        since = record.retrying_since or now
        attempts = record.attempts + 1
        elapsed = (now - since).total_seconds()
        if record.status in COMING_UP and not waits and elapsed >= self.settings.retry_budget:
            self._fail(
                database_id,
                f"gave up after {attempts} attempts over {elapsed:.0f} s "
                f"(DBPROV_RETRY_BUDGET is {self.settings.retry_budget:g} s); last error: {error}",
            )
            return
        delay = backoff(attempts)
        self.records.transition(
            database_id,
            {record.status},
            attempts=attempts,
            # No streak runs while it waits: the budget counts from the node's return.
            retrying_since=None if waits else since,
            next_attempt_at=now + timedelta(seconds=delay),
            last_error=f"{error} (attempt {attempts}; next in {delay:.0f} s)",
            event="retrying",
            details={"attempt": attempts, "error": error.splitlines()[0]},
        )
        log.warning(
            "database %s: %s; attempt %d, next in %.1f s", database_id, error, attempts, delay
        )

    def _back_to_sleep(self, record: Database, error: str) -> None:
        """A wake that failed for a passing reason: asleep again, its port held
        again by the next pass. Retried on a schedule instead, its port would
        be nobody's until then, and a client would meet a refused connection
        rather than be told why; asleep, the next connection wakes it again,
        and hears the reason if that fails too."""
        self.records.transition(
            record.id,
            {Status.WAKING},
            status=Status.SLEEPING,
            last_error=error,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
            event="wake-failed",
            details={"error": error.splitlines()[0]},
        )
        log.warning("database %s: could not be woken: %s; asleep again", record.id, error)

    def _fail(self, database_id: str, error: str) -> None:
        """Record the failure and leave nothing running or holding a port.

        A database that was ready once keeps its data: it is the tenant's,
        and DELETE is what discards it.
        """
        record = self._load(database_id)
        kept = record.ready_at is not None
        self._give_back_port(database_id)
        try:
            self.runtime.remove_server(database_id, keep_data=kept)
        except TransientError as exc:
            # The orphan sweep removes it once the engine answers.
            log.warning("database %s: server left for the sweep: %s", database_id, exc.detail)
        if kept:
            error += (
                f"\nIts data is kept: POST /databases/{database_id}/start tries again (on a new port), "
                "DELETE discards it."
            )
        self._transition(
            database_id,
            COMING_UP,
            status=Status.FAILED,
            details={"error": error.splitlines()[0]},
            last_error=error,
            host_port=None,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
        )
        log.warning("database %s: failed: %s", database_id, error.splitlines()[0])

    def _lose(self, database_id: str, reason: str) -> None:
        """Say out loud that the data is gone, and the ways back."""
        self._give_back_port(database_id)
        self._transition(
            database_id,
            COMING_UP | MEANT_TO_RUN,
            status=Status.LOST,
            details={"reason": reason},
            last_error=f"{reason}.\nWays back: POST /databases/{database_id}/reset with a snapshot of it "
                       "(GET /snapshots); or DELETE it.",
            host_port=None,
            attempts=0,
            next_attempt_at=None,
            retrying_since=None,
        )
        log.warning("database %s: lost: %s", database_id, reason)
