"""A record's compare-and-set: what it writes, what it leaves, and what it records beside."""

from __future__ import annotations

from sqlalchemy import select

from service.domain.models import PHASE_BUCKETS, Database, Event, PhaseHistogram, Status
from service.domain.requests import CreateRequest
from service.domain.tenancy import LOCAL_ADMIN


def test_a_transition_updates_the_sessions_copy_and_records_its_event(services):
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(name="app"))
    with services.store.transaction() as session:
        held = session.get(Database, created.id)
        assert held.status == Status.PENDING
        written = services.records.transition(
            created.id, {Status.PENDING}, session=session, actor="token:abc",
            status=Status.FAILED, last_error="no", phase_timings={"server": 0.3},
        )
        # The same object, with the values written: no stale copy in the session.
        assert written is held
        assert (held.status, held.last_error, held.phase_timings) == (Status.FAILED, "no", {"server": 0.3})
    with services.store.read() as session:
        stored = session.get(Database, created.id)
        events = session.execute(
            select(Event.kind, Event.actor).where(Event.database_id == created.id).order_by(Event.id)
        ).all()
        counts = dict(session.execute(
            select(PhaseHistogram.bucket, PhaseHistogram.count).where(PhaseHistogram.phase == "server")
        ).all())
    assert (stored.status, stored.last_error) == (Status.FAILED, "no")
    assert stored.updated_at > created.updated_at
    assert [tuple(e) for e in events] == [("requested", "local"), ("failed", "token:abc")]
    # 0.3 s: counted in the buckets from 0.5 s up (cumulative), not in those below.
    within = PHASE_BUCKETS.index(0.5)
    assert [counts[bucket] for bucket in (within - 1, within, len(PHASE_BUCKETS))] == [0, 1, 1]


def test_a_transition_from_a_status_the_record_is_not_in_changes_nothing(services):
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(name="app"))
    assert services.records.transition(
        created.id, {Status.READY, Status.STOPPED}, status=Status.DELETING
    ) is None
    assert services.records.transition(created.id, {Status.READY}, status=Status.DELETING) is None
    with services.store.read() as session:
        stored = session.get(Database, created.id)
        kinds = session.scalars(select(Event.kind).where(Event.database_id == created.id)).all()
    assert stored.status == Status.PENDING and stored.updated_at == created.updated_at
    assert kinds == ["requested"]


def test_a_transition_from_one_of_several_statuses(services):
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(name="app"))
    written = services.records.transition(created.id, {Status.READY, Status.PENDING}, status=Status.DELETING)
    assert written.status == Status.DELETING
