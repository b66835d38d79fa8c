"""The reconciler's state machine on a fake runtime."""

from __future__ import annotations

from service.tenancy import LOCAL_ADMIN
from service.models import Database, Status
from service.runtime import ContainerSpec, labels_for


def record(services, database_id: str) -> Database:
    with services.store.transaction() as session:
        return session.get(Database, database_id)


def test_pending_becomes_ready_with_timings(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN, "app-one", "15")
    reconciler.run_once(wait=True)
    ready = record(services, created.id)
    assert ready.status == Status.READY
    assert ready.ready_at is not None and ready.last_error is None
    assert set(ready.phase_timings) == {"create", "start", "ready", "setup", "total"}
    assert ready.container_id == runtime.containers[f"dbprov-{created.id}"].info.id
    assert ready.volume_name == f"dbprov-{created.id}-data"
    spec = runtime.containers[f"dbprov-{created.id}"].spec
    assert spec.image == "postgres:15" and spec.volume == ready.volume_name
    assert spec.labels == labels_for("test", created.id)


def test_a_pass_is_idempotent(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    runtime.calls.clear()
    reconciler.run_once(wait=True)
    assert "create_container" not in runtime.calls and "start_container" not in runtime.calls
    assert record(services, created.id).status == Status.READY


def test_provisioning_left_by_a_crash_is_finished(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    # A previous process created the container and died before starting it.
    reconciler._transition(created.id, (Status.PENDING,), status=Status.PROVISIONING)
    runtime.ensure_volume(f"dbprov-{created.id}-data", labels_for("test", created.id))
    runtime.create_container(reconciler._spec(created, labels_for("test", created.id)))
    reconciler.run_once(wait=True)
    assert record(services, created.id).status == Status.READY
    assert len(runtime.containers) == 1


def test_container_that_exits_fails_with_its_log_and_leaves_nothing(services, reconciler, runtime):
    runtime.crashing_images["postgres:17"] = "initdb: error: invalid locale settings"
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED
    assert "container exited (exit code 1)" in failed.last_error
    assert "invalid locale settings" in failed.last_error
    assert failed.host_port is None
    assert runtime.containers == {} and runtime.volumes == {}


def test_never_ready_fails_after_the_timeout(services, reconciler, runtime):
    services.server_admin.starting_up = True
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED
    assert "not ready within 2 s (container running)" in failed.last_error
    assert "the database system is starting up" in failed.last_error
    assert runtime.containers == {}


def test_deleting_removes_container_and_volume_and_frees_the_port(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    services.databases.delete(LOCAL_ADMIN, created.id)
    reconciler.run_once(wait=True)
    gone = record(services, created.id)
    assert gone.status == Status.DELETED and gone.host_port is None and gone.deleted_at
    assert runtime.containers == {} and runtime.volumes == {}


def test_delete_while_pending_never_starts_anything(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    services.databases.delete(LOCAL_ADMIN, created.id)
    reconciler.run_once(wait=True)
    assert record(services, created.id).status == Status.DELETED
    assert "create_container" not in runtime.calls


def test_stopped_container_of_a_ready_database_is_started(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    runtime.set_state(f"dbprov-{created.id}", "exited")
    reconciler.run_once(wait=True)
    assert runtime.containers[f"dbprov-{created.id}"].info.state == "running"
    assert record(services, created.id).status == Status.READY


def test_vanished_container_is_recreated_on_its_volume(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    first = record(services, created.id)
    runtime.containers.clear()
    reconciler.run_once(wait=True)
    repaired = record(services, created.id)
    assert repaired.status == Status.READY
    assert repaired.container_id != first.container_id
    assert repaired.ready_at == first.ready_at and repaired.host_port == first.host_port
    assert list(runtime.volumes) == [f"dbprov-{created.id}-data"]


def test_failed_repair_keeps_the_volume(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    runtime.containers.clear()
    runtime.crashing_images["postgres:17"] = "PANIC: could not locate a valid checkpoint record"
    reconciler.run_once(wait=True)
    failed = record(services, created.id)
    assert failed.status == Status.FAILED and "checkpoint" in failed.last_error
    assert list(runtime.volumes) == [f"dbprov-{created.id}-data"]
    reconciler.run_once(wait=True)  # the sweep keeps it too
    assert list(runtime.volumes) == [f"dbprov-{created.id}-data"]
    services.databases.delete(LOCAL_ADMIN, created.id)
    reconciler.run_once(wait=True)
    assert runtime.volumes == {}


def test_orphans_of_this_instance_are_removed_and_others_kept(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    for instance, database_id in (("test", "0123456789ab"), ("elsewhere", "ba9876543210")):
        labels = labels_for(instance, database_id)
        runtime.ensure_volume(f"dbprov-{database_id}-data", labels)
        runtime.create_container(
            ContainerSpec(
                name=f"dbprov-{database_id}", image="postgres:17", environment={},
                host_ip="127.0.0.1", host_port=1, volume=f"dbprov-{database_id}-data",
                labels=labels,
            )
        )
    reconciler.run_once(wait=True)
    assert sorted(runtime.containers) == sorted([f"dbprov-{created.id}", "dbprov-ba9876543210"])
    assert sorted(runtime.volumes) == sorted(
        [f"dbprov-{created.id}-data", "dbprov-ba9876543210-data"]
    )


def test_port_taken_by_another_program_moves_the_database(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    runtime.foreign_ports.add(created.host_port)
    reconciler.run_once(wait=True)
    ready = record(services, created.id)
    assert ready.status == Status.READY
    assert ready.host_port != created.host_port
    assert len(runtime.containers) == 1


def test_engine_outage_postpones_without_failing(services, reconciler, runtime):
    created = services.databases.create(LOCAL_ADMIN)
    runtime.reachable = False
    reconciler._submit(created.id, reconciler._provision)
    reconciler.wait_idle()
    assert record(services, created.id).status in (Status.PENDING, Status.PROVISIONING)
    runtime.reachable = True
    reconciler.run_once(wait=True)
    assert record(services, created.id).status == Status.READY


def test_network_removed_behind_the_services_back_is_made_again(services, reconciler, runtime):
    first = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)
    runtime.networks.clear()
    second = services.databases.create(LOCAL_ADMIN)
    reconciler.run_once(wait=True)  # start fails: the cached network is gone
    assert record(services, second.id).status == Status.PROVISIONING
    assert f"dbprov-{second.id}" not in runtime.containers
    reconciler.run_once(wait=True)
    assert record(services, second.id).status == Status.READY
    assert runtime.networks == {"dbprov-test"}
    assert record(services, first.id).status == Status.READY
