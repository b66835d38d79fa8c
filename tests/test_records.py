"""A record's compare-and-set: what it writes, what it leaves, and what it records beside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from sqlalchemy import select

from service.domain.models import (
    DATABASE_MOVES,
    PHASE_BUCKETS,
    SNAPSHOT_MOVES,
    TEMPLATE_MOVES,
    Database,
    Event,
    PhaseHistogram,
    Snapshot,
    SnapshotStatus,
    Status,
    Template,
    TemplateStatus,
)
from service.errors import IllegalMove
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


@pytest.mark.parametrize("model, moves", [
    (Database, DATABASE_MOVES), (Snapshot, SNAPSHOT_MOVES), (Template, TEMPLATE_MOVES),
])
def test_every_status_has_its_row_of_moves_and_moves_only_to_statuses(model, moves):
    statuses = type(next(iter(moves[None])))
    assert set(moves) == {None, *statuses}
    assert all(targets <= set(statuses) and None not in targets for targets in moves.values())
    # Nothing comes back from deleted.
    assert moves[statuses("deleted")] == frozenset()


def test_a_move_that_is_not_in_the_table_is_refused_before_anything_is_written(services):
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(name="app"))
    assert Status.READY not in DATABASE_MOVES[Status.PENDING]
    with pytest.raises(IllegalMove, match="from pending to ready"):
        services.records.transition(created.id, {Status.PENDING}, status=Status.READY)
    # One source of several that may not make the move is enough to refuse it.
    with pytest.raises(IllegalMove, match="from deleted to deleting"):
        services.records.transition(created.id, {Status.PENDING, Status.DELETED}, status=Status.DELETING)
    with pytest.raises(IllegalMove, match="from nothing to ready"):
        services.records.add(None, Database(id="0" * 12, status=Status.READY))
    with services.store.read() as session:
        stored = session.get(Database, created.id)
        kinds = session.scalars(select(Event.kind).where(Event.database_id == created.id)).all()
    assert stored.status == Status.PENDING and stored.updated_at == created.updated_at
    assert kinds == ["requested"]
    with services.store.transaction() as session:
        with pytest.raises(IllegalMove, match="a template may not move from ready to building"):
            services.records.compare_and_set(
                session, Template, "t", {TemplateStatus.READY}, status=TemplateStatus.BUILDING
            )
        with pytest.raises(IllegalMove, match="a snapshot may not move from deleted to ready"):
            services.records.compare_and_set_all(
                session, Snapshot, Snapshot.id.in_(["s"]), {SnapshotStatus.DELETED}, status=SnapshotStatus.READY
            )


# Where a status is written other than through Records: an UPDATE of a row
# with a status among its values, a status assigned to a loaded row, or a new
# row added with one.
_MODELS = {"Database", "Snapshot", "Template"}


def _status_writes(tree: ast.AST) -> list[int]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "values":
            if any(keyword.arg == "status" for keyword in node.keywords) and _updates_a_model(node.func.value):
                found.append(node.lineno)
        elif isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "status" for t in targets):
                found.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add"
              and node.args and isinstance(node.args[0], ast.Call)
              and getattr(node.args[0].func, "id", None) in _MODELS):
            found.append(node.lineno)
    return sorted(found)


def _updates_a_model(node: ast.AST) -> bool:
    return any(
        isinstance(inner, ast.Call) and getattr(inner.func, "id", None) == "update"
        and inner.args and getattr(inner.args[0], "id", None) in _MODELS
        for inner in ast.walk(node)
    )


def test_only_records_writes_a_status():
    package = Path(__file__).resolve().parents[1] / "service"
    writers = {
        str(path.relative_to(package)): lines
        for path in sorted(package.rglob("*.py"))
        if path.name != "records.py" and (lines := _status_writes(ast.parse(path.read_text())))
    }
    assert writers == {}


def test_the_writer_check_sees_each_kind_of_write():
    code = """
session.execute(update(Snapshot).where(Snapshot.id == 1).values(status="ready"))
record.status = Status.READY
session.add(Template(id="t", status="building"))
session.execute(update(Database).values(name="x"))
"""
    assert _status_writes(ast.parse(code)) == [2, 3, 4]
