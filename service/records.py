"""The one way a database record comes into being or changes status.

Every change is a compare-and-set on the status the writer expects, and is
announced: to the other processes through the store's change feed, and to
this process's reconciler and waiting requests through its notifiers, once
the transaction has committed.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import ColumnElement, event, update
from sqlalchemy.orm import Session

from .models import Database, Status, utcnow
from .notify import Notifier
from .store import Store


class Records:
    def __init__(self, store: Store, wanted: Notifier, changed: Notifier) -> None:
        self.store = store
        # Something is wanted of the reconciler / a record changed, for waiters.
        self.wanted = wanted
        self.changed = changed

    def add(self, session: Session, record: Database) -> None:
        """Insert a new record inside the caller's transaction."""
        session.add(record)
        self._announce(session, record.id)

    def transition(
        self,
        database_id: str,
        expected: Collection[Status],
        *,
        session: Session | None = None,
        only_if: ColumnElement[bool] | None = None,
        **values,
    ) -> Database | None:
        """Write ``values`` if the record's status is one of ``expected``.

        Returns the record as written, or None if it had moved on (another
        writer got there first). With ``session``, inside the caller's
        transaction; otherwise in one of its own. ``only_if``: a further
        condition the record must meet.
        """
        if session is None:
            with self.store.transaction() as own:
                return self.transition(database_id, expected, session=own, only_if=only_if, **values)
        conditions = [Database.id == database_id, Database.status.in_(list(expected))]
        if only_if is not None:
            conditions.append(only_if)
        statement = (
            update(Database)
            .where(*conditions)
            .values(updated_at=utcnow(), **values)
            .returning(Database)
            # The ORM's copy of the row, if the session has one, takes the new values.
            .execution_options(synchronize_session="fetch")
        )
        record = session.scalars(statement).one_or_none()
        if record is not None:
            self._announce(session, database_id)
        return record

    def _announce(self, session: Session, database_id: str) -> None:
        self.store.announce(session, database_id)
        # Local waiters are told after the commit, so that they read the change.
        if not event.contains(session, "after_commit", self._notify):
            event.listen(session, "after_commit", self._notify, once=True)

    def _notify(self, _session: Session) -> None:
        self.wanted.notify()
        self.changed.notify()
