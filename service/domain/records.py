"""The one way a database, snapshot or template comes into being or changes status.

Every change is a compare-and-set on the status the writer expects, allowed
by the table of moves in ``models`` (any other is a bug, refused before it is
written), and is announced: to the other processes through the store's change feed, and to
this process's reconciler and waiting requests through its notifiers, once
the transaction has committed.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import ColumnElement, bindparam, delete, event, insert, select, update
from sqlalchemy.orm import Session

from ..errors import IllegalMove
from ..store.engine import Store
from ..store.notify import Notifier
from .models import (
    DATABASE_MOVES,
    NOT_DELETED,
    PHASE_BUCKETS,
    SNAPSHOT_MOVES,
    TEMPLATE_MOVES,
    Database,
    Event,
    IdempotencyKey,
    PhaseHistogram,
    Snapshot,
    Status,
    Template,
    utcnow,
)

T = TypeVar("T")

# Who did it, when nobody asked: the reconciler, expiry, the idle stop.
SERVICE = "service"

# The event a status change records unless the writer names another.
_EVENT_OF = {
    Status.PENDING: "requested",
    Status.PROVISIONING: "provisioning",
    Status.READY: "ready",
    Status.FAILED: "failed",
    Status.LOST: "lost",
    Status.STOPPING: "stopping",
    Status.STOPPED: "stopped",
    Status.STARTING: "starting",
    Status.DELETING: "deleting",
    Status.DELETED: "deleted",
}

_MOVES = {Database: DATABASE_MOVES, Snapshot: SNAPSHOT_MOVES, Template: TEMPLATE_MOVES}


def check_move(model: type, expected: Collection, target) -> None:
    """Refuse a write of status ``target`` over any of ``expected`` that the
    table of ``model``'s moves does not allow (``None``: a new row)."""
    moves = _MOVES[model]
    for source in expected:
        if source != target and target not in moves[source]:
            raise IllegalMove(
                f"a {model.__name__.lower()} may not move from "
                f"{source.value if source else 'nothing'} to {target.value}"
            )


class Records:
    def __init__(self, store: Store, wanted: Notifier, changed: Notifier) -> None:
        self.store = store
        # Something is wanted of the reconciler / a record changed, for waiters.
        self.wanted = wanted
        self.changed = changed
        # Re-read interval while waiting; raised when a change feed delivers nudges.
        self.poll_interval = 0.25

    def wait(self, read: Callable[[], T], busy: Callable[[T], bool], timeout: float) -> T:
        """``read()`` once ``busy`` says no more, or as it is when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.changed.generation
            value = read()
            remaining = deadline - time.monotonic()
            if not busy(value) or remaining <= 0:
                return value
            # Writers nudge ``changed`` (in this process, or through the
            # store's change feed); the cap bounds the wait when nothing can.
            self.changed.wait(min(remaining, self.poll_interval), since=seen)

    def add(self, session: Session, record: Database, actor: str = SERVICE) -> None:
        """Insert a new record inside the caller's transaction."""
        check_move(Database, [None], record.status)
        session.add(record)
        self.event(session, record, "requested", actor, {"version": record.version})
        self.announce(session)

    def event(
        self, session: Session, record: Database, kind: str, actor: str = SERVICE, details: dict | None = None
    ) -> None:
        """Record that ``kind`` happened to ``record``, inside the caller's transaction."""
        session.execute(_INSERT_EVENT, {
            "database_id": record.id, "tenant": record.tenant, "at": utcnow(), "kind": kind, "actor": actor,
            "details": details or {},
        })

    def transition(
        self,
        database_id: str,
        expected: Collection[Status],
        *,
        session: Session | None = None,
        only_if: ColumnElement[bool] | None = None,
        actor: str = SERVICE,
        event: str | None = None,
        details: dict | None = None,
        **values,
    ) -> Database | None:
        """Write ``values`` if the record's status is one of ``expected``.

        Returns the record as written, or None if it had moved on (another
        writer got there first). With ``session``, inside the caller's
        transaction; otherwise in one of its own. ``only_if``: a further
        condition the record must meet. A change of status is recorded as its
        event (or as ``event``, with ``details``), done by ``actor``.
        """
        if "status" in values:
            check_move(Database, expected, values["status"])
        if session is None:
            with self.store.transaction() as own:
                return self.transition(
                    database_id, expected, session=own, only_if=only_if, actor=actor,
                    event=event, details=details, **values,
                )
        if only_if is None:
            # The common case: a statement built once per set of columns.
            statement = _update_statement(tuple(sorted(values)), len(expected))
            record = session.scalars(statement, {
                "_id": database_id, "_expected": next(iter(expected)) if len(expected) == 1 else list(expected),
                "_updated_at": utcnow(), **{f"_{key}": value for key, value in values.items()},
            }).one_or_none()
        else:
            statement = (
                update(Database)
                .where(Database.id == database_id, Database.status.in_(expected), only_if)
                .values(updated_at=utcnow(), **values)
                .returning(Database)
                # The ORM's copy of the row, if the session has one, takes the new values.
                .execution_options(synchronize_session="fetch")
            )
            record = session.scalars(statement).one_or_none()
        if record is not None:
            if values.get("phase_timings"):
                _observe(session, values["phase_timings"])
            kind = event or _EVENT_OF.get(values.get("status"))
            if kind is not None:
                self.event(session, record, kind, actor, details)
            self.announce(session)
        return record

    def finish_rotation(self, database_id: str, pending: str, actor: str = SERVICE) -> Database | None:
        """Make ``pending`` (a rotation's encrypted password, now set on the
        server) the password, if it is still the one pending; the record as
        written, or None."""
        return self.transition(
            database_id, NOT_DELETED, only_if=Database.pending_password == pending, actor=actor,
            event="credentials-rotated", password=pending, pending_password=None, pending_since=None,
        )

    def purge(self, event_retention: float, key_retention: float) -> tuple[int, int]:
        """Drop the events of databases deleted longer ago than ``event_retention``
        seconds, and idempotency keys older than ``key_retention``; returns how many."""
        now = utcnow()
        gone = select(Database.id).where(
            Database.status == Status.DELETED, Database.deleted_at < now - timedelta(seconds=event_retention)
        )
        with self.store.transaction() as session:
            events = session.execute(delete(Event).where(Event.database_id.in_(gone))).rowcount
            keys = session.execute(
                delete(IdempotencyKey).where(IdempotencyKey.created_at < now - timedelta(seconds=key_retention))
            ).rowcount
        return events, keys

    def insert(self, session: Session, row: Snapshot | Template) -> None:
        """Insert a new snapshot or template inside the caller's transaction."""
        check_move(type(row), [None], row.status)
        session.add(row)
        self.announce(session)

    def compare_and_set(
        self, session: Session, model: type[T], row_id: str, expected: Collection, **values
    ) -> T | None:
        """Write ``values`` to a snapshot's or template's row if its status is
        one of ``expected``, announced so that waiters look again; the row as
        written, or None if it had moved on."""
        if "status" in values:
            check_move(model, expected, values["status"])
        row = session.scalars(
            update(model)
            .where(model.id == row_id, model.status.in_(list(expected)))
            .values(**values)
            .returning(model)
            .execution_options(synchronize_session="fetch")
        ).one_or_none()
        if row is not None:
            self.announce(session)
        return row

    def compare_and_set_all(
        self, session: Session, model: type, which: ColumnElement[bool], expected: Collection, **values
    ) -> int:
        """``compare_and_set`` on every row of ``model`` that ``which`` selects; how many it wrote."""
        if "status" in values:
            check_move(model, expected, values["status"])
        written = session.execute(
            update(model).where(which, model.status.in_(list(expected))).values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if written:
            self.announce(session)
        return written

    def announce(self, session: Session) -> None:
        """Tell every process, once the transaction commits, that records changed."""
        if session.info.get("announced"):
            return
        session.info["announced"] = True
        # One notice per transaction, sent as it commits: by then it is known
        # whether the reconcilers may wait (``wake_later``).
        event.listen(session, "before_commit", self._tell_others, once=True)
        # Local waiters are told after the commit, so that they read the change.
        event.listen(session, "after_commit", self._notify, once=True)

    def wake_later(self, session: Session, seconds: float) -> None:
        """Let this transaction's changes wait ``seconds`` for the reconcilers,
        rather than wake them at the commit."""
        session.info["wake_in"] = seconds

    def _tell_others(self, session: Session) -> None:
        self.store.announce(session, session.info.get("wake_in"))

    def _notify(self, session: Session) -> None:
        session.info.pop("announced", None)
        later = session.info.pop("wake_in", None)
        if later is None:
            self.wanted.notify()
        else:
            self.wanted.notify_in(later)
        self.changed.notify()


def _observe(session: Session, timings: dict[str, float]) -> None:
    """Count a provisioning's phases into the histogram, in the caller's transaction."""
    for phase, seconds in timings.items():
        # Every bucket whose bound it is within; +Inf (the last) always.
        first = bisect.bisect_left(PHASE_BUCKETS, seconds)
        session.execute(_OBSERVE, {"_phase": phase, "_first": first, "_seconds": seconds})


@functools.cache
def _update_statement(columns: tuple[str, ...], statuses: int):
    """A compare-and-set of ``columns`` (and updated_at) on a record in one of
    ``statuses`` expected statuses, returning it as the session's Database.

    Built once per shape: building an UPDATE of twenty values and its
    RETURNING, with the ORM's bulk-update bookkeeping, costs about as much as
    running it, and a claim and every step of the reconciler write one.
    """
    table = Database.__table__
    expected = (
        table.c.status == bindparam("_expected") if statuses == 1
        else table.c.status.in_(bindparam("_expected", expanding=True))
    )
    core = (
        update(table)
        .where(table.c.id == bindparam("_id"), expected)
        .values({"updated_at": bindparam("_updated_at"), **{key: bindparam(f"_{key}") for key in columns}})
        .returning(*table.c)
    )
    # The session's copy of the row, if it has one, takes the new values.
    return select(Database).from_statement(core).execution_options(populate_existing=True)


# Statements every transition may run, built once.
_INSERT_EVENT = insert(Event.__table__)
_histogram = PhaseHistogram.__table__.c
_OBSERVE = (
    update(PhaseHistogram.__table__)
    .where(_histogram.phase == bindparam("_phase"), _histogram.bucket >= bindparam("_first"))
    .values(count=_histogram.count + 1, seconds=_histogram.seconds + bindparam("_seconds"))
)
