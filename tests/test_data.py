"""Snapshots, clones, resets, templates, dumps and restores, on a fake runtime
whose "data" is a string that copies carry along."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from service.domain.models import Database, Snapshot, SnapshotStatus, Status, Template, TemplateStatus, utcnow
from service.errors import InsufficientStorage, JobTimedOut, RuntimeUnavailable
from service.runtime.protocol import RUNNING, JobResult

from .test_api import assert_problem
from .test_lifecycle import kinds
from .test_tenancy import api, token  # noqa: F401 - fixtures

ASYNC = {"Prefer": "respond-async"}


def record(services, database_id: str) -> Database:
    with services.store.read() as session:
        return session.get(Database, database_id)


def snapshot_record(services, snapshot_id: str) -> Snapshot:
    with services.store.read() as session:
        return session.get(Snapshot, snapshot_id)


def settle(services, reconciler, passes: int = 4) -> None:
    """Passes enough for chained work (a snapshot, then the clone that waits for it)."""
    for _ in range(passes):
        with services.store.transaction() as session:
            session.query(Database).update({Database.next_attempt_at: None})
        reconciler.run_once(wait=True)


@pytest.fixture
def ready(client, services, reconciler, runtime):
    """A ready database whose data says "orders"."""
    created = client.post("/databases", json={}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    runtime.data[created["id"]] = "orders"
    return created


def test_a_snapshot_is_a_copy_taken_with_a_short_stop(client, services, reconciler, runtime, ready):
    taken = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC)
    assert taken.status_code == 202 and taken.get_json()["status"] == "pending"
    assert taken.headers["Location"] == f"/snapshots/{taken.get_json()['id']}"
    reconciler.run_once(wait=True)
    snapshot = client.get(f"/snapshots/{taken.get_json()['id']}").get_json()
    assert snapshot["status"] == "ready" and snapshot["size_bytes"] == len("orders")
    assert runtime.data[snapshot["id"]] == "orders"
    # Stopped for the copy, and running again.
    assert runtime.calls.count("stop_server") == 1 and runtime.servers[ready["id"]].state == RUNNING
    assert kinds(client, ready["id"])[-2:] == ["snapshot-requested", "snapshot-taken"]
    assert [s["id"] for s in client.get("/snapshots").get_json()["items"]] == [snapshot["id"]]


def test_a_snapshot_on_a_pool_is_taken_of_the_running_server_after_a_checkpoint(
    client, services, reconciler, runtime, ready
):
    runtime.live_copies = True
    taken = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    assert client.get(f"/snapshots/{taken['id']}").get_json()["status"] == "ready"
    assert runtime.data[taken["id"]] == "orders"
    # Never stopped: the copy is of one instant, and the checkpoint keeps its recovery short.
    assert "stop_server" not in runtime.calls and "start_server" not in runtime.calls
    assert services.server_admin.checkpoints == 1
    assert client.get(f"/databases/{ready['id']}").get_json()["status"] == "ready"


def test_a_snapshot_is_postponed_while_the_engine_cannot_say_how_to_take_it(
    client, services, reconciler, runtime, ready, monkeypatch, caplog
):
    def unreachable(database_id):
        raise RuntimeUnavailable("Docker engine unreachable: fake is down")

    monkeypatch.setattr(runtime, "copies_live", unreachable)
    taken = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    assert client.get(f"/snapshots/{taken['id']}").get_json()["status"] == "pending"
    assert "stop_server" not in runtime.calls
    # Postponed as any transient error is: said in a line, not a traceback.
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    monkeypatch.undo()
    reconciler.run_once(wait=True)
    assert client.get(f"/snapshots/{taken['id']}").get_json()["status"] == "ready"


def test_a_snapshot_with_no_room_in_the_pool_fails_saying_so(client, services, reconciler, runtime, ready,
                                                            monkeypatch):
    runtime.live_copies = True

    def full(source_id, target_id, image):
        raise InsufficientStorage("no room for a copy: the storage pool /pool has 10 MiB free")

    monkeypatch.setattr(runtime, "copy_data", full)
    taken = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    snapshot = client.get(f"/snapshots/{taken['id']}").get_json()
    assert snapshot["status"] == "failed" and "10 MiB free" in snapshot["last_error"]
    assert client.get(f"/databases/{ready['id']}").get_json()["status"] == "ready"


def test_a_nearly_full_pool_refuses_snapshots_clones_and_resets_and_changes_nothing(
    client, services, reconciler, runtime, ready
):
    snapshot = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    runtime.pool_free = services.settings.storage_min_free - 1
    before = len(client.get("/databases").get_json()["items"])
    for path, body in (
        (f"/databases/{ready['id']}/snapshots", None),
        ("/databases", {"from_snapshot": snapshot["id"]}),
        ("/databases", {"from_database": ready["id"]}),
        (f"/databases/{ready['id']}/reset", {"snapshot": snapshot["id"]}),
    ):
        body = assert_problem(client.post(path, json=body), 507, "insufficient-storage")
        assert "DBPROV_STORAGE_MIN_FREE" in body["detail"]
    assert len(client.get("/databases").get_json()["items"]) == before
    assert len(client.get("/snapshots").get_json()["items"]) == 1
    assert client.get(f"/databases/{ready['id']}").get_json()["status"] == "ready"
    # A fresh database copies nothing: made as ever.
    assert client.post("/databases", json={}, headers=ASYNC).status_code == 202


def test_snapshots_are_the_tenants_and_count_against_a_quota(api, services, token, reconciler, settings):
    services.settings = services.databases.settings = services.snapshots.settings = dataclasses.replace(
        settings, snapshot_quota=1
    )
    alice, bob = token("alice"), token("bob")
    created = api.post("/databases", json={}, headers={**alice, **ASYNC}).get_json()
    reconciler.run_once(wait=True)
    first = api.post(f"/databases/{created['id']}/snapshots", headers={**alice, **ASYNC}).get_json()
    assert_problem(api.post(f"/databases/{created['id']}/snapshots", headers=alice), 403, "quota-exceeded")
    assert_problem(api.get(f"/snapshots/{first['id']}", headers=bob), 404, "not-found")
    assert_problem(api.post(f"/databases/{created['id']}/snapshots", headers=bob), 404, "not-found")
    assert api.get("/snapshots", headers=bob).get_json()["items"] == []
    assert_problem(
        api.post("/databases", json={"from_snapshot": first["id"]}, headers=bob), 404, "not-found"
    )


def test_a_clone_of_a_database_refused_leaves_no_snapshot(client, services, reconciler, ready):
    services.tenants.set_limit("default", 1)
    assert_problem(client.post("/databases", json={"from_database": ready["id"]}), 403, "quota-exceeded")
    reconciler.run_once(wait=True)
    assert client.get("/snapshots").get_json()["items"] == []
    assert kinds(client, ready["id"])[-1] != "snapshot-taken"


def test_a_clone_starts_with_the_copy_and_lives_apart(client, services, reconciler, runtime, ready):
    snapshot = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    clone = client.post("/databases", json={"from_snapshot": snapshot["id"]}, headers=ASYNC).get_json()
    settle(services, reconciler)
    cloned = record(services, clone["id"])
    assert cloned.status == Status.READY and cloned.source_snapshot_id == snapshot["id"]
    assert runtime.data[clone["id"]] == "orders"
    # Its own password, port and server.
    source = record(services, ready["id"])
    assert cloned.password != source.password and cloned.host_port != source.host_port
    runtime.data[ready["id"]] = "orders, later"
    runtime.data[clone["id"]] = "orders, cloned"
    assert runtime.data[snapshot["id"]] == "orders"


def test_a_clone_of_a_database_takes_a_snapshot_first(client, services, reconciler, runtime, ready):
    clone = client.post("/databases", json={"from_database": ready["id"]}, headers=ASYNC).get_json()
    assert clone["source_snapshot_id"] is not None
    settle(services, reconciler)
    assert record(services, clone["id"]).status == Status.READY
    assert runtime.data[clone["id"]] == "orders"
    assert client.get(f"/snapshots/{clone['source_snapshot_id']}").get_json()["status"] == "ready"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"from_snapshot": "0123456789ab", "from_database": "0123456789ab"}, "from_database"),
        ({"from_snapshot": "not-an-id"}, "from_snapshot"),
        ({"template": "a b"}, "template"),
    ],
)
def test_a_bad_source_is_refused(client, body, field):
    problem = assert_problem(client.post("/databases", json=body), 422, "validation-error")
    assert field in problem["errors"]["json"]


def test_reset_puts_the_data_back_and_keeps_the_password(client, services, reconciler, runtime, ready):
    snapshot = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    clone = client.post("/databases", json={"from_snapshot": snapshot["id"]}, headers=ASYNC).get_json()
    settle(services, reconciler)
    before = record(services, clone["id"])
    runtime.data[clone["id"]] = "scribbled on by a test"
    resetting = client.post(f"/databases/{clone['id']}/reset", headers=ASYNC)
    assert resetting.status_code == 202 and resetting.get_json()["status"] == "resetting"
    settle(services, reconciler)
    after = record(services, clone["id"])
    assert after.status == Status.READY and runtime.data[clone["id"]] == "orders"
    assert after.password == before.password and after.host_port == before.host_port
    assert kinds(client, clone["id"])[-2:] == ["resetting", "reset"]
    # The source itself goes back to a snapshot named in the body.
    runtime.data[ready["id"]] = "gone wrong"
    assert client.post(f"/databases/{ready['id']}/reset", json={"snapshot": snapshot["id"]}, headers=ASYNC).status_code == 202
    settle(services, reconciler)
    assert runtime.data[ready["id"]] == "orders"


def test_a_snapshot_asked_for_before_a_reset_or_a_delete_holds_the_data_as_it_was(
    client, services, reconciler, runtime, ready
):
    first = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    runtime.data[ready["id"]] = "orders and refunds"
    # Asked for in this order, with no pass in between: the snapshot first.
    second = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    assert client.post(f"/databases/{ready['id']}/reset", json={"snapshot": first["id"]},
                       headers=ASYNC).status_code == 202
    settle(services, reconciler)
    assert snapshot_record(services, second["id"]).status == SnapshotStatus.READY
    assert runtime.data[second["id"]] == "orders and refunds"
    assert runtime.data[ready["id"]] == "orders" and record(services, ready["id"]).status == Status.READY

    third = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    assert client.delete(f"/databases/{ready['id']}").status_code == 202
    settle(services, reconciler)
    assert snapshot_record(services, third["id"]).status == SnapshotStatus.READY
    assert runtime.data[third["id"]] == "orders" and record(services, ready["id"]).status == Status.DELETED


def test_clones_from_a_database_and_their_snapshots_come_and_go_within_a_small_quota(
    client, services, reconciler, runtime, ready
):
    services.snapshots.settings = dataclasses.replace(services.settings, snapshot_quota=2)
    for cycle in range(20):
        clone = client.post("/databases", json={"from_database": ready["id"]}, headers=ASYNC)
        assert clone.status_code == 202, (cycle, clone.get_json())
        settle(services, reconciler)
        clone = client.get(f"/databases/{clone.get_json()['id']}").get_json()
        assert clone["status"] == "ready" and runtime.data[clone["id"]] == "orders"
        assert client.delete(f"/databases/{clone['id']}").status_code == 202
        settle(services, reconciler)
        # Its snapshot went with it.
        assert snapshot_record(services, clone["source_snapshot_id"]).status == SnapshotStatus.DELETED
    # The tenant's own snapshots still count, up to the quota.
    for _ in range(2):
        assert client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).status_code == 202
    assert_problem(client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC), 403, "quota-exceeded")


def test_a_rotation_while_a_snapshot_is_pending_is_asked_again_later(client, services, reconciler, ready):
    before = client.get(f"/databases/{ready['id']}/credentials").get_json()["password"]
    assert client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).status_code == 202
    refused = client.post(f"/databases/{ready['id']}/credentials/rotate")
    problem = assert_problem(refused, 409, "conflict")
    assert "snapshotted" in problem["detail"] and refused.headers["Retry-After"] == "5"
    assert client.get(f"/databases/{ready['id']}/credentials").get_json()["password"] == before
    reconciler.run_once(wait=True)
    assert client.post(f"/databases/{ready['id']}/credentials/rotate").status_code == 200


def test_a_reset_to_another_tenants_snapshot_is_not_found(client, services, ready):
    services.tenants.create_token("acme")
    with services.store.transaction() as session:
        session.add(Snapshot(
            id="ac0000000001", tenant="acme", database_id="ac0000000000", status=SnapshotStatus.READY,
            version="17", image="postgres:17", admin_username="dbprov_admin", admin_password="x",
        ))
    # The local admin sees every snapshot, but a database of tenant "default"
    # cannot take acme's data.
    refused = client.post(f"/databases/{ready['id']}/reset", json={"snapshot": "ac0000000001"})
    problem = assert_problem(refused, 404, "not-found")
    assert "version" not in problem["detail"]


def test_reset_without_a_snapshot_to_go_back_to_is_refused(client, ready):
    assert_problem(client.post(f"/databases/{ready['id']}/reset"), 409, "conflict")
    assert client.get(f"/databases/{ready['id']}").get_json()["status"] == "ready"


def test_a_snapshot_outlives_its_database_until_it_is_deleted(client, services, reconciler, runtime, ready):
    snapshot = client.post(f"/databases/{ready['id']}/snapshots", headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    client.delete(f"/databases/{ready['id']}")
    settle(services, reconciler)
    assert record(services, ready["id"]).status == Status.DELETED
    assert runtime.data[snapshot["id"]] == "orders"
    clone = client.post("/databases", json={"from_snapshot": snapshot["id"]}, headers=ASYNC).get_json()
    settle(services, reconciler)
    assert runtime.data[clone["id"]] == "orders"
    assert client.delete(f"/snapshots/{snapshot['id']}").get_json()["status"] == "deleting"
    settle(services, reconciler)
    assert snapshot_record(services, snapshot["id"]).status == SnapshotStatus.DELETED
    assert snapshot["id"] not in runtime.data
    assert_problem(client.get(f"/snapshots/{snapshot['id']}"), 404, "not-found")


# -- templates ----------------------------------------------------------------------


def test_a_template_is_built_once_and_cloned_from_its_pool(client, services, running, runtime):
    first = client.post("/templates", json={"key": "sha256:abc"})
    assert first.status_code == 201, first.get_json()
    body = first.get_json()
    assert body["status"] == "building" and body["database"]["status"] == "ready"
    assert body["database"]["connection_uri"]
    runtime.data[body["database"]["id"]] = "migrated schema"
    waiting = client.post("/templates", json={"key": "sha256:abc"})
    assert_problem(waiting, 423, "locked")
    assert int(waiting.headers["Retry-After"]) > 0
    finalized = client.post("/templates/sha256:abc/finalize", json={"pool_size": 2})
    assert finalized.status_code == 200 and finalized.get_json()["status"] == "ready"
    again = client.post("/templates", json={"key": "sha256:abc"})
    assert again.status_code == 200 and again.get_json()["database"] is None

    def pooled() -> list[Database]:
        with services.store.read() as session:
            return list(session.query(Database).filter(
                Database.template_id == body["id"], Database.tenant == "_pool", Database.status == Status.READY))

    for _ in range(100):
        if len(pooled()) == 2:
            break
        running.records.changed.wait(0.05)
    assert len(pooled()) == 2
    clone = client.post("/databases", json={"template": "sha256:abc"}).get_json()
    assert clone["status"] == "ready" and "claim" in clone["phase_timings"]
    assert runtime.data[clone["id"]] == "migrated schema"
    # The builder's database is gone: the snapshot holds the data.
    for _ in range(100):
        if record(services, body["database"]["id"]).status == Status.DELETED:
            break
        running.records.changed.wait(0.05)
    assert record(services, body["database"]["id"]).status == Status.DELETED


def test_a_template_settles_when_its_snapshot_is_taken_the_moment_it_is_asked_for(
    client, services, reconciler, monkeypatch
):
    # A running reconciler may take the snapshot before finalize returns: the
    # template must be finalizing by then, or nothing ever settles it.
    client.post("/templates", json={"key": "quick"}, headers=ASYNC)
    reconciler.run_once(wait=True)
    update = services.templates._update
    passes = []

    def pass_first(session, template_id, expected, **values):
        if values.get("status") == TemplateStatus.FINALIZING:
            # Between the snapshot's request and the template's new state, a
            # pass of its own thread, given time to take whatever it can see.
            passes.append(threading.Thread(target=reconciler.run_once, kwargs={"wait": True}))
            passes[0].start()
            passes[0].join(0.5)
        return update(session, template_id, expected, **values)

    monkeypatch.setattr(services.templates, "_update", pass_first)
    assert client.post("/templates/quick/finalize", headers=ASYNC).get_json()["status"] == "finalizing"
    passes[0].join()
    reconciler.run_once(wait=True)
    assert client.get("/templates/quick").get_json()["status"] == "ready"


def test_a_template_and_its_snapshot_settle_together(client, services, reconciler, monkeypatch):
    # Settling the template fails as a crash between two commits would:
    # the snapshot stays pending, so the next pass takes it again.
    client.post("/templates", json={"key": "whole"}, headers=ASYNC)
    reconciler.run_once(wait=True)
    snapshot_id = client.post("/templates/whole/finalize", headers=ASYNC).get_json()["snapshot_id"]
    settle = services.templates.settle

    def cut_off(*args, **kwargs):
        settle(*args, **kwargs)
        raise RuntimeError("the process ends here")

    monkeypatch.setattr(services.templates, "settle", cut_off)
    reconciler.run_once(wait=True)
    assert snapshot_record(services, snapshot_id).status == SnapshotStatus.PENDING
    assert client.get("/templates/whole").get_json()["status"] == "finalizing"
    monkeypatch.undo()
    reconciler.run_once(wait=True)
    assert snapshot_record(services, snapshot_id).status == SnapshotStatus.READY
    assert client.get("/templates/whole").get_json()["status"] == "ready"


def test_concurrent_first_requests_build_one_template(client, services):
    with ThreadPoolExecutor(max_workers=5) as pool:
        answers = list(pool.map(
            lambda _: client.post("/templates", json={"key": "k1"}, headers=ASYNC), range(5)
        ))
    assert sorted(a.status_code for a in answers) == [202, 423, 423, 423, 423]
    assert len(client.get("/templates").get_json()["items"]) == 1


def test_deleting_a_template_drains_its_pool(client, services, running, runtime):
    client.post("/templates", json={"key": "k2"})
    finalized = client.post("/templates/k2/finalize", json={"pool_size": 1}).get_json()
    for _ in range(100):
        if any(r.tenant == "_pool" and r.status == Status.READY for r in _all(services)):
            break
        running.records.changed.wait(0.05)
    assert client.delete("/templates/k2").status_code == 202
    assert_problem(client.get("/templates/k2"), 404, "not-found")
    assert_problem(client.post("/databases", json={"template": "k2"}), 404, "not-found")
    for _ in range(100):
        if all(r.status == Status.DELETED for r in _all(services)):
            break
        running.records.changed.wait(0.05)
    assert all(r.status == Status.DELETED for r in _all(services))
    for _ in range(100):
        if snapshot_record(services, finalized["snapshot_id"]).status == SnapshotStatus.DELETED:
            break
        running.records.changed.wait(0.05)
    assert snapshot_record(services, finalized["snapshot_id"]).status == SnapshotStatus.DELETED
    assert finalized["snapshot_id"] not in runtime.data


def test_a_template_whose_build_was_abandoned_frees_its_key(client, services, reconciler):
    started = client.post("/templates", json={"key": "k3"}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    # The builder's database goes (its client deleted it, or it failed):
    # nobody can finish the build, and the key must not stay locked.
    assert client.delete(f"/databases/{started['database']['id']}").status_code == 202
    again = client.post("/templates", json={"key": "k3"}, headers=ASYNC)
    assert again.status_code == 202, again.get_json()
    assert again.get_json()["id"] != started["id"] and again.get_json()["database"] is not None
    assert [t["id"] for t in client.get("/templates").get_json()["items"]] == [again.get_json()["id"]]


def test_a_failed_template_gets_a_fresh_build_for_the_next_client(client, services, reconciler):
    started = client.post("/templates", json={"key": "k5"}, headers=ASYNC).get_json()
    reconciler.run_once(wait=True)
    assert client.post("/templates/k5/finalize", headers=ASYNC).status_code == 202
    # Its snapshot failed (the reconciler's word on it).
    with services.store.transaction() as session:
        services.templates.settle(session, started["id"], snapshot_ready=False)
    assert client.get("/templates/k5").get_json()["status"] == "failed"
    again = client.post("/templates", json={"key": "k5"}, headers=ASYNC)
    assert again.status_code == 202, again.get_json()
    assert again.get_json()["id"] != started["id"] and again.get_json()["database"] is not None
    assert [t["id"] for t in client.get("/templates").get_json()["items"]] == [again.get_json()["id"]]


def test_a_template_left_without_its_database_frees_its_key_after_a_while(client, services):
    # Recorded, then the process that began it ended before its database was.
    def left(age: timedelta) -> None:
        with services.store.transaction() as session:
            session.query(Template).delete()
            session.add(Template(id="abandoned000", tenant="default", key="k4", version="17",
                                 status=TemplateStatus.BUILDING, created_at=utcnow() - age))

    left(timedelta(seconds=1))
    assert_problem(client.post("/templates", json={"key": "k4"}, headers=ASYNC), 423, "locked")
    assert_problem(client.post("/templates/k4/finalize"), 409, "conflict")
    left(timedelta(minutes=5))
    assert client.post("/templates", json={"key": "k4"}, headers=ASYNC).status_code == 202


def test_a_template_deleted_while_it_is_finalized_takes_its_snapshot_along(client, services, reconciler,
                                                                           monkeypatch):
    client.post("/templates", json={"key": "k5"}, headers=ASYNC)
    reconciler.run_once(wait=True)
    get = services.templates.get

    def finalized_meanwhile(principal, key):
        read = get(principal, key)  # as the delete read it: building, no snapshot
        monkeypatch.setattr(services.templates, "get", get)
        services.templates.finalize(principal, key, 0)
        return read

    monkeypatch.setattr(services.templates, "get", finalized_meanwhile)
    assert client.delete("/templates/k5").get_json()["snapshot_id"] is not None
    settle(services, reconciler)
    assert all(r.status == Status.DELETED for r in _all(services))
    with services.store.read() as session:
        assert [s.status for s in session.query(Snapshot)] == [SnapshotStatus.DELETED]


def test_pool_members_of_a_template_deleted_as_they_were_stocked_are_removed(client, services, reconciler):
    client.post("/templates", json={"key": "k6"}, headers=ASYNC)
    reconciler.run_once(wait=True)
    client.post("/templates/k6/finalize", json={"pool_size": 1}, headers=ASYNC)
    settle(services, reconciler)
    # Deleted by another process as this one stocked a member: the drain did not see it.
    with services.store.transaction() as session:
        session.query(Template).update({Template.status: TemplateStatus.DELETED})
    settle(services, reconciler)
    pooled = [r for r in _all(services) if r.tenant == "_pool"]
    assert pooled and all(r.status == Status.DELETED for r in pooled)


def _all(services) -> list[Database]:
    with services.store.read() as session:
        return list(session.query(Database))


# -- dumps and restores ----------------------------------------------------------------


def test_a_dump_streams_the_jobs_output(client, services, reconciler, runtime, ready):
    response = client.get(f"/databases/{ready['id']}/dump")
    assert response.status_code == 200 and response.mimetype == "application/octet-stream"
    assert response.get_data() == b"orders"
    command = runtime.jobs[-1][1]
    assert command[:2] == ["pg_dump", "--format=custom"]
    # As the tenant, never the server's superuser.
    assert "--username=app" in command and runtime.jobs[-1][2]["PGPASSWORD"] == ready["password"]


def test_a_restore_runs_pg_restore_on_the_uploaded_archive(client, services, runtime, ready):
    archive = b"PGDMP" + b"\0" * 100
    response = client.post(f"/databases/{ready['id']}/restore", data=archive,
                           headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.get_json()
    database_id, command, environment, given = runtime.jobs[-1]
    assert given == archive and command[0] == "pg_restore" and "--single-transaction" in command
    # As the tenant's own login: an archive's RESET ROLE would undo a superuser's --role.
    assert "--username=app" in command and not [a for a in command if a.startswith("--role")]
    assert environment["PGPASSWORD"] == ready["password"] and command[-1] == "/tmp/input"
    assert kinds(client, ready["id"])[-1] == "restored"


def _restore(client, database_id: str, archive: bytes = b"PGDMP" + b"\0" * 100):
    return client.post(f"/databases/{database_id}/restore", data=archive,
                       headers={"Content-Type": "application/octet-stream"})


def test_a_restore_past_its_timeout_is_its_own_answer_and_not_retried(client, services, runtime, ready):
    services.dumps.settings = dataclasses.replace(services.settings, restore_timeout=7.0)
    runtime.job_results.append(JobTimedOut("pg_restore ran longer than 7 s and was stopped"))
    response = _restore(client, ready["id"])
    problem = assert_problem(response, 504, "job-timed-out")
    # Not 503: the client retries that, and would upload the archive again.
    assert "7 s" in problem["detail"] and "Retry-After" not in response.headers
    assert "restored" not in kinds(client, ready["id"])


def test_a_restore_whose_emptiness_check_fails_says_so(client, services, runtime, ready):
    port = record(services, ready["id"]).host_port
    services.server_admin.failing_relations.add(port)
    problem = assert_problem(_restore(client, ready["id"]), 502, "database-server-error")
    assert "nothing was changed" in problem["detail"] and runtime.jobs == []


def test_a_restore_that_does_not_fit_on_the_disk_is_refused_before_a_byte_is_spooled(
    client, services, runtime, ready, monkeypatch
):
    import service.domain.dumps

    monkeypatch.setattr(service.domain.dumps, "_SPOOL_RESERVE", 1.0)
    problem = assert_problem(_restore(client, ready["id"]), 507, "insufficient-storage")
    assert "does not fit" in problem["detail"] and runtime.jobs == []


def test_a_tenant_runs_at_most_its_transfers_at_once(client, services, runtime, ready):
    services.dumps.settings = dataclasses.replace(services.settings, tenant_transfers=2)
    runtime.data[ready["id"]] = "orders and more orders"
    first = client.get(f"/databases/{ready['id']}/dump", buffered=False)
    second = client.get(f"/databases/{ready['id']}/dump", buffered=False)
    assert first.status_code == second.status_code == 200
    third = client.get(f"/databases/{ready['id']}/dump")
    assert_problem(third, 429, "rate-limited")
    assert "DBPROV_TENANT_TRANSFERS" in third.get_json()["detail"]
    assert_problem(_restore(client, ready["id"]), 429, "rate-limited")
    # A dump read to its end, or one whose client went away, frees its slot.
    assert first.get_data() == b"orders and more orders"
    second.close()
    assert client.get(f"/databases/{ready['id']}/dump").status_code == 200
    assert _restore(client, ready["id"]).status_code == 200


def test_the_service_runs_at_most_its_restores_at_once(client, services, runtime, ready):
    services.dumps.settings = dataclasses.replace(services.settings, restores=1)
    with services.dumps.slots.hold("restores", 1) as mine:
        assert mine
        response = _restore(client, ready["id"])
    assert "DBPROV_RESTORES" in assert_problem(response, 429, "rate-limited")["detail"]
    assert runtime.jobs == []
    assert _restore(client, ready["id"]).status_code == 200


def test_the_databases_inside_a_server_are_listed_dumped_and_restored_by_name(client, services, runtime, ready):
    port = record(services, ready["id"]).host_port
    path = f"/databases/{ready['id']}"
    assert [d["name"] for d in client.get(path + "/contents").get_json()["items"]] == ["app"]

    # Restoring into a database the server lacks makes it, as the tenant's.
    response = client.post(path + "/restore?database=app_test", data=b"PGDMP",
                           headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.get_json()
    assert "--dbname=app_test" in runtime.jobs[-1][1]
    assert services.server_admin.made[port] == {"app_test"}
    contents = client.get(path + "/contents").get_json()["items"]
    assert [(d["name"], d["owner"]) for d in contents] == [("app", "app"), ("app_test", "app")]
    events = client.get(path + "/events").get_json()["items"]
    assert events[-1]["kind"] == "restored" and events[-1]["details"]["database"] == "app_test"
    # A failed restore leaves no database made for it.
    runtime.job_results.append(JobResult(1, "pg_restore: error: not an archive"))
    failed = client.post(path + "/restore?database=scratch", data=b"x",
                         headers={"Content-Type": "application/octet-stream"})
    assert_problem(failed, 422, "validation-error")
    assert services.server_admin.made[port] == {"app_test"}

    dump = client.get(path + "/dump?database=app_test")
    assert dump.status_code == 200 and "--dbname=app_test" in runtime.jobs[-1][1]
    assert 'filename="' + ready["id"] + '-app_test.dump"' in dump.headers["Content-Disposition"]
    assert_problem(client.get(path + "/dump?database=nowhere"), 404, "not-found")
    roles = client.get(path + "/globals")
    assert roles.status_code == 200 and roles.mimetype == "application/sql"
    assert runtime.jobs[-1][1][:3] == ["pg_dumpall", "--globals-only", "--no-role-passwords"]
    for query in ("database=template1", "database=a%20b", "database="):
        assert_problem(client.get(path + "/dump?" + query), 422, "validation-error")
    assert_problem(client.post(path + "/restore?database=template1", data=b"x",
                               headers={"Content-Type": "application/octet-stream"}), 422, "validation-error")


def test_a_dump_counts_against_the_rate_limit(api, services, token, reconciler):
    services.tenants.settings = dataclasses.replace(services.settings, rate_limit=2, rate_burst=2)
    acme = token("acme")
    created = api.post("/databases", json={}, headers={**acme, **ASYNC}).get_json()
    settle(services, reconciler)
    assert api.get(f"/databases/{created['id']}/dump", headers=acme).status_code == 200
    assert_problem(api.get(f"/databases/{created['id']}/dump", headers=acme), 429, "rate-limited")


def test_a_bad_archive_is_refused_with_the_tools_message(client, runtime, ready):
    runtime.job_results.append(JobResult(1, "pg_restore: error: input file does not appear to be a valid archive"))
    response = client.post(f"/databases/{ready['id']}/restore", data=b"not a dump",
                           headers={"Content-Type": "application/octet-stream"})
    problem = assert_problem(response, 422, "validation-error")
    assert "does not appear to be a valid archive" in problem["detail"]


def test_a_restore_needs_an_empty_database_an_archive_and_a_size_within_the_limit(
    client, services, runtime, ready, settings
):
    port = record(services, ready["id"]).host_port
    services.server_admin.relations[port] = 3
    busy = client.post(f"/databases/{ready['id']}/restore", data=b"x", headers={"Content-Type": "application/octet-stream"})
    assert_problem(busy, 409, "conflict")
    services.server_admin.relations[port] = 0
    assert client.post(f"/databases/{ready['id']}/restore", json={}).status_code == 415
    services.settings = dataclasses.replace(settings, restore_max_bytes=10)
    too_big = client.post(f"/databases/{ready['id']}/restore", data=b"x" * 11,
                          headers={"Content-Type": "application/octet-stream"})
    assert too_big.status_code == 413
    assert runtime.jobs == []


def test_a_bad_clone_request_takes_no_snapshot(client, services, ready):
    response = client.post("/databases", json={"from_database": ready["id"], "plan": "huge"})
    assert_problem(response, 422, "validation-error")
    assert client.get("/snapshots").get_json()["items"] == []
