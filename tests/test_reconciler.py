"""The reconciler's state machine and failure model on a fake runtime."""

from __future__ import annotations

import logging
from datetime import timedelta

from service.domain.models import Database, Status, utcnow
from service.domain.requests import CreateRequest
from service.domain.tenancy import LOCAL_ADMIN
from service.errors import EngineRefused
from service.reconciler.steps import backoff
from service.runtime.protocol import CRASHED, RUNNING, STOPPED, ServerSpec

from .fakes import AWAY


def record(services, database_id: str) -> Database:
    with services.store.transaction() as session:
        return session.get(Database, database_id)


def due_now(services, database_id: str) -> None:
    """Skip the backoff wait of a postponed record."""
    services.records.transition(
        database_id, set(Status), next_attempt_at=utcnow() - timedelta(seconds=1)
    )


def test_pending_becomes_ready_with_timings(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(name="app-one", version="15"))
    reconciler.run_once(wait=True)
    ready = record(services, created.id)
    assert ready.status == Status.READY
    assert ready.ready_at is not None and ready.last_error is None and ready.attempts == 0
    assert set(ready.phase_timings) == {"server", "ready", "setup", "total"}
    assert ready.server_host == "127.0.0.1"
    spec = runtime.servers[created.id].spec
    assert spec.image == "postgres:15" and spec.port == ready.host_port
    assert spec.environment["POSTGRES_USER"] == "dbprov_admin"


def test_a_pass_is_idempotent(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    runtime.calls.clear()
    reconciler.run_once(wait=True)
    assert "create" not in runtime.calls and "start" not in runtime.calls
    assert record(services, created.id).status == Status.READY


def test_provisioning_left_by_a_crash_is_finished(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    # A previous process made the server and died before it was ready.
    services.records.transition(created.id, {Status.PENDING}, status=Status.PROVISIONING)
    runtime.ensure_server(reconciler._spec(created))
    reconciler.run_once(wait=True)
    assert record(services, created.id).status == Status.READY
    assert list(runtime.servers) == [created.id]


def test_server_that_exits_fails_at_once_with_its_log_and_leaves_nothing(services, reconciler, runtime):
    runtime.crashing_images["postgres:17"] = "initdb: error: invalid locale settings"
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED and failed.attempts == 0
    assert "server exited (exit code 1)" in failed.last_error
    assert "invalid locale settings" in failed.last_error
    assert failed.host_port is None
    assert runtime.servers == {} and runtime.data == {}


def test_never_ready_fails_after_the_timeout(services, reconciler, runtime):
    services.server_admin.starting_up = True
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED
    assert "not ready within 2 s (server running)" in failed.last_error
    assert "the database system is starting up" in failed.last_error
    assert runtime.servers == {}


def test_deleting_removes_server_and_data_and_frees_the_port(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    services.databases.delete(LOCAL_ADMIN, created.id)
    reconciler.run_once(wait=True)
    gone = record(services, created.id)
    assert gone.status == Status.DELETED and gone.host_port is None and gone.deleted_at
    assert runtime.servers == {} and runtime.data == {}


def test_delete_while_pending_never_starts_anything(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    services.databases.delete(LOCAL_ADMIN, created.id)
    reconciler.run_once(wait=True)
    assert record(services, created.id).status == Status.DELETED
    assert "create" not in runtime.calls


def test_stopped_server_of_a_ready_database_is_started(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    runtime.stop_server(created.id)
    reconciler.run_once(wait=True)
    assert runtime.servers[created.id].state == RUNNING
    assert record(services, created.id).status == Status.READY


def test_vanished_server_is_made_anew_on_its_data(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    first = record(services, created.id)
    generation = runtime.servers[created.id].generation
    runtime.servers.clear()
    reconciler.run_once(wait=True)
    repaired = record(services, created.id)
    assert repaired.status == Status.READY
    assert runtime.servers[created.id].generation > generation
    assert repaired.ready_at == first.ready_at and repaired.host_port == first.host_port
    assert list(runtime.data) == [created.id]


def test_failed_repair_keeps_the_data(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    runtime.servers.clear()
    runtime.crashing_images["postgres:17"] = "PANIC: could not locate a valid checkpoint record"
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED and "checkpoint" in failed.last_error
    assert list(runtime.data) == [created.id] and runtime.servers == {}
    reconciler.run_once(wait=True)  # the sweep keeps it too
    assert list(runtime.data) == [created.id]
    services.databases.delete(LOCAL_ADMIN, created.id)
    reconciler.run_once(wait=True)
    assert runtime.data == {}


def test_orphans_are_removed(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    runtime.ensure_server(ServerSpec("0123456789ab", "postgres:17", "postgres", "", port=1))
    runtime.data["ba9876543210"] = "left by a crash"
    reconciler.run_once(wait=True)
    assert list(runtime.servers) == [created.id] and list(runtime.data) == [created.id]


def test_port_taken_by_another_program_moves_the_database(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    runtime.foreign_ports.add(created.host_port)
    reconciler.run_once(wait=True)
    ready = record(services, created.id)
    assert ready.status == Status.READY
    assert ready.host_port != created.host_port
    assert list(runtime.servers) == [created.id]


def test_engine_outage_is_retried_with_backoff_kept_on_the_record(services, reconciler, runtime, caplog):
    created = services.databases.create(LOCAL_ADMIN)
    runtime.reachable = False
    with caplog.at_level(logging.WARNING):
        reconciler.run_once(wait=True)
    postponed = record(services, created.id)
    assert postponed.status in (Status.PENDING, Status.PROVISIONING)
    assert postponed.attempts == 1 and postponed.retrying_since is not None
    assert postponed.next_attempt_at > utcnow()
    assert "Docker engine unreachable" in postponed.last_error and "attempt 1" in postponed.last_error
    # Expected failures are one line each, never a traceback.
    assert not any(r.exc_info for r in caplog.records)
    # Not due yet: a pass leaves it alone.
    reconciler.run_once(wait=True)
    assert record(services, created.id).attempts == 1
    runtime.reachable = True
    due_now(services, created.id)
    reconciler.run_once(wait=True)
    ready = record(services, created.id)
    assert ready.status == Status.READY
    assert ready.attempts == 0 and ready.next_attempt_at is None and ready.last_error is None


def test_a_transient_error_past_its_budget_fails_saying_what_was_tried(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    runtime.reachable = False
    reconciler.run_once(wait=True)
    # As if the engine had been down for longer than DBPROV_RETRY_BUDGET (600 s).
    services.records.transition(
        created.id, set(Status), retrying_since=utcnow() - timedelta(seconds=601)
    )
    due_now(services, created.id)
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED and failed.host_port is None
    assert failed.last_error.startswith("gave up after 2 attempts over 601 s")
    assert "Docker engine unreachable" in failed.last_error
    # The engine comes back: the sweep removes what the failure could not.
    runtime.reachable = True
    reconciler.run_once(wait=True)
    assert runtime.servers == {} and runtime.data == {}


def test_a_refused_configuration_fails_on_the_first_attempt(services, reconciler, runtime, monkeypatch):
    def refuse(spec):
        raise EngineRefused("Docker engine refused: invalid mount config")

    monkeypatch.setattr(runtime, "ensure_server", refuse)
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED and failed.attempts == 0
    assert failed.last_error == "Docker engine refused: invalid mount config"


def test_an_image_that_vanished_fails_the_database_at_once(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    runtime.missing_images.add("postgres:17")
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED
    assert "cannot pull postgres:17" in failed.last_error
    assert runtime.servers == {} and runtime.data == {}


def test_deletion_during_an_outage_is_retried_until_it_is_done(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    services.databases.delete(LOCAL_ADMIN, created.id)
    runtime.reachable = False
    reconciler.run_once(wait=True)
    assert record(services, created.id).status == Status.DELETING
    assert record(services, created.id).attempts == 1
    runtime.reachable = True
    due_now(services, created.id)
    reconciler.run_once(wait=True)
    assert record(services, created.id).status == Status.DELETED
    assert runtime.servers == {} and runtime.data == {}


def test_backoff_grows_to_its_cap_with_jitter():
    assert 0.5 <= backoff(1) <= 1.0
    assert 4.0 <= backoff(4) <= 8.0
    assert 30.0 <= backoff(20) <= 60.0
    assert len({backoff(3) for _ in range(20)}) > 1


# -- a machine that is away (a Swarm node down) ------------------------------------


def ready_database(services, reconciler) -> str:
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    assert record(services, created.id).status == Status.READY
    return created.id


def events_of(services, database_id: str) -> list:
    return services.databases.events(LOCAL_ADMIN, database_id)


def test_a_database_whose_machine_is_away_is_unavailable_until_it_is_back(
    services, reconciler, runtime, caplog
):
    database_id = ready_database(services, reconciler)
    runtime.away.add(database_id)
    with caplog.at_level(logging.WARNING):
        reconciler.run_once(wait=True)
    unavailable = record(services, database_id)
    assert unavailable.status == Status.UNAVAILABLE
    assert unavailable.last_error == AWAY
    event = events_of(services, database_id)[-1]
    assert (event.kind, event.details) == ("unavailable", {"reason": AWAY})
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"database {database_id}: unavailable until its machine is back: {AWAY}"]
    assert not any(r.exc_info for r in caplog.records)

    # While it is away: neither started nor made anew, and nothing more is recorded.
    runtime.calls.clear()
    reconciler.run_once(wait=True)
    reconciler.run_once(wait=True)
    assert not {"start_server", "ensure_server", "create", "remove_server"} & set(runtime.calls)
    assert record(services, database_id).status == Status.UNAVAILABLE
    assert [e.kind for e in events_of(services, database_id)].count("unavailable") == 1

    # Back, its server stopped meanwhile, and at another address: started, and ready once SELECT 1 works.
    services.records.transition(database_id, set(Status), server_host="10.0.0.9")
    runtime.away.clear()
    runtime.set_state(database_id, STOPPED)
    reconciler.run_once(wait=True)
    back = record(services, database_id)
    assert back.status == Status.READY and back.last_error is None
    assert back.server_host == "127.0.0.1"
    assert runtime.servers[database_id].state == RUNNING and "start_server" in runtime.calls
    assert events_of(services, database_id)[-1].kind == "available"


def test_an_unavailable_database_whose_server_does_not_come_back_stays_unavailable(
    services, reconciler, runtime, caplog
):
    database_id = ready_database(services, reconciler)
    runtime.away.add(database_id)
    reconciler.run_once(wait=True)
    runtime.away.clear()
    runtime.set_state(database_id, CRASHED)
    runtime.crashing_images["postgres:17"] = "PANIC: could not open file \"global/pg_control\""
    with caplog.at_level(logging.WARNING):
        reconciler.run_once(wait=True)
    still = record(services, database_id)
    assert still.status == Status.UNAVAILABLE and "pg_control" in still.last_error
    # Its data is kept, and nothing is failed or removed: a later pass tries again.
    assert database_id in runtime.servers and database_id in runtime.data
    assert not any(r.exc_info for r in caplog.records)
    assert still.attempts == 1 and still.next_attempt_at > utcnow()
    del runtime.crashing_images["postgres:17"]
    reconciler.run_once(wait=True)  # not due yet
    assert record(services, database_id).status == Status.UNAVAILABLE
    due_now(services, database_id)
    reconciler.run_once(wait=True)
    back = record(services, database_id)
    assert back.status == Status.READY and back.attempts == 0 and back.next_attempt_at is None


def test_an_unavailable_database_is_deleted_once_its_machine_is_back(services, reconciler, runtime):
    database_id = ready_database(services, reconciler)
    runtime.away.add(database_id)
    reconciler.run_once(wait=True)
    assert services.databases.delete(LOCAL_ADMIN, database_id).status == Status.DELETING
    reconciler.run_once(wait=True)
    waiting = record(services, database_id)
    assert waiting.status == Status.DELETING and waiting.attempts == 1 and "is down" in waiting.last_error
    # The server is gone already; its data goes with its machine's return.
    assert database_id not in runtime.servers and database_id in runtime.data
    runtime.away.clear()
    due_now(services, database_id)
    reconciler.run_once(wait=True)
    assert record(services, database_id).status == Status.DELETED
    assert runtime.data == {}


def test_a_database_that_was_ready_waits_for_its_machine_without_spending_the_budget(
    services, reconciler, runtime
):
    database_id = ready_database(services, reconciler)
    services.databases.stop(LOCAL_ADMIN, database_id)
    reconciler.run_once(wait=True)
    runtime.away.add(database_id)
    services.databases.start(LOCAL_ADMIN, database_id)
    reconciler.run_once(wait=True)
    assert record(services, database_id).attempts == 1
    # Longer than DBPROV_RETRY_BUDGET (600 s) since the streak began: still waiting.
    services.records.transition(database_id, set(Status), retrying_since=utcnow() - timedelta(seconds=601))
    due_now(services, database_id)
    reconciler.run_once(wait=True)
    waiting = record(services, database_id)
    assert waiting.status == Status.STARTING and waiting.attempts == 2
    assert "is down" in waiting.last_error and waiting.retrying_since is None
    runtime.away.clear()
    due_now(services, database_id)
    reconciler.run_once(wait=True)
    assert record(services, database_id).status == Status.READY


def test_a_new_database_whose_machine_is_away_keeps_the_budget(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    runtime.away.add(created.id)
    reconciler.run_once(wait=True)
    services.records.transition(created.id, set(Status), retrying_since=utcnow() - timedelta(seconds=601))
    due_now(services, created.id)
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED and failed.last_error.startswith("gave up after 2 attempts")
    assert "is down" in failed.last_error


def test_the_sweep_goes_on_past_an_orphan_it_cannot_remove(services, reconciler, runtime, monkeypatch, caplog):
    purged = []
    monkeypatch.setattr(services.records, "purge", lambda *retention: purged.append(retention) or (0, 0))
    # Listed first: on a machine that is away.
    runtime.data["000000000000"] = "on a lost node"
    runtime.away.add("000000000000")
    runtime.ensure_server(ServerSpec("ffffffffffff", "postgres:17", "postgres", "", port=1))
    with caplog.at_level(logging.WARNING):
        reconciler.run_once(wait=True)
    assert "ffffffffffff" not in runtime.servers and "ffffffffffff" not in runtime.data
    assert "000000000000" in runtime.data
    assert purged and not any(r.exc_info for r in caplog.records)
    assert any("left for a later pass" in r.getMessage() for r in caplog.records)
    runtime.away.clear()
    reconciler.run_once(wait=True)
    assert runtime.data == {}
