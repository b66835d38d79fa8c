"""The warm pool on a fake runtime: stocking, claiming, falling back."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from sqlalchemy import select

from service.composition import Services
from service.domain import pool, templates
from service.domain.models import Database, Status, Template, TemplateStatus
from service.domain.requests import CreateRequest, NewDatabase
from service.domain.tenancy import LOCAL_ADMIN, POOL_TENANT, Principal
from service.errors import QuotaExceeded, ValidationError
from service.store.coordination import ChangeListener
from service.store.crypto import Vault
from service.store.engine import Store
from service.store.notify import Notifier

from .fakes import FakePostgres
from .test_data import settle


@pytest.fixture
def pooled(settings, runtime, monkeypatch):
    """Services with two warm servers of version 17 kept ready, refilled at once."""
    monkeypatch.setattr(pool, "_REFILL_DELAY", 0.0)
    settings = dataclasses.replace(settings, pool_sizes={"17": 2})
    services = Services(
        settings, Store(settings.database_url), runtime, Vault(settings.secret_keys),
        server_admin=FakePostgres(runtime),
    )
    services.store.upgrade(services.vault)
    reconciler = services.reconciler()
    yield services, reconciler
    reconciler.stop()
    services.store.dispose()


def members(services, status=None) -> list[Database]:
    with services.store.transaction() as session:
        query = session.query(Database).filter(Database.tenant == POOL_TENANT)
        if status is not None:
            query = query.filter(Database.status == status)
        return query.all()


def test_the_reconciler_keeps_the_pool_stocked_and_invisible(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    warm = members(services, Status.READY)
    assert len(warm) == 2 and {m.version for m in warm} == {"17"}
    assert len(runtime.servers) == 2
    # Each warm server has its tenant role with a password of its own, made
    # and checked at stocking, so that a claim needs no round trip.
    passwords = [services.vault.decrypt(m.password) for m in warm]
    assert [services.server_admin.roles[m.host_port]["app"] for m in warm] == passwords
    assert len(set(passwords)) == 2
    assert services.databases.list(LOCAL_ADMIN).total == 0
    reconciler.run_once(wait=True)
    assert len(members(services)) == 2  # stocked once, not twice


def test_a_create_claims_a_warm_server_and_the_pool_refills(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    warm_ids = {m.id for m in members(services, Status.READY)}
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(name="quick"))
    assert created.status == Status.READY and created.id in warm_ids
    assert created.tenant == "default" and created.name == "quick"
    assert set(created.phase_timings) == {"claim"}
    password = services.vault.decrypt(created.password)
    assert services.server_admin.roles[created.host_port]["app"] == password
    assert services.databases.get(LOCAL_ADMIN, created.id).status == Status.READY

    reconciler.run_once(wait=True)
    assert len(members(services, Status.READY)) == 2
    assert created.id not in {m.id for m in members(services)}
    assert len(runtime.servers) == 3


def test_a_database_that_need_not_be_durable_is_made_not_claimed(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    warm_ids = {m.id for m in members(services, Status.READY)}
    # A warm server syncs its writes; one that does not is another server.
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(durable=False))
    assert created.id not in warm_ids and created.status == Status.PENDING
    assert not created.durable
    reconciler.run_once(wait=True)
    assert "fsync=off" in runtime.servers[created.id].spec.command
    assert all("fsync=off" not in runtime.servers[id_].spec.command for id_ in warm_ids)


def test_a_claimed_member_is_replaced_a_moment_later_unless_the_pool_is_empty(pooled, runtime, monkeypatch):
    services, reconciler = pooled
    monkeypatch.setattr(pool, "_REFILL_DELAY", 60.0)
    reconciler.run_once(wait=True)
    services.databases.create(LOCAL_ADMIN, CreateRequest(name="first"))
    reconciler.run_once(wait=True)
    # Another is ready: the replacement waits, so its server's start does not
    # compete with the first use of the one just handed out.
    (waiting,) = members(services, Status.PENDING)
    assert waiting.next_attempt_at is not None
    assert len(runtime.servers) == 2
    # The pool emptied: the next replacement is made at once.
    services.databases.create(LOCAL_ADMIN, CreateRequest(name="second"))
    reconciler.run_once(wait=True)
    assert len(members(services, Status.READY)) == 1
    assert len(runtime.servers) == 3


def test_a_claim_wakes_the_reconciler_when_its_replacement_is_due(pooled, monkeypatch):
    services, reconciler = pooled
    monkeypatch.setattr(pool, "_REFILL_DELAY", 0.3)
    reconciler.run_once(wait=True)
    wanted = services.records.wanted
    seen = wanted.generation
    services.databases.create(LOCAL_ADMIN, CreateRequest(name="first"))
    # Another is ready: no pass while the client makes its first connection...
    assert wanted.generation == seen
    # ...but one when the replacement is due.
    assert wanted.wait(5.0, since=seen)
    # The last one: the pool is refilled at once.
    seen = wanted.generation
    services.databases.create(LOCAL_ADMIN, CreateRequest(name="second"))
    assert wanted.generation > seen


# Processes share a PostgreSQL store only.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_claim_wakes_other_processes_reconcilers_when_its_replacement_is_due(pooled, monkeypatch):
    services, reconciler = pooled
    monkeypatch.setattr(pool, "_REFILL_DELAY", 0.3)
    reconciler.run_once(wait=True)
    # Another process's (a worker's) ears on the change feed.
    wanted, changed = Notifier(), Notifier()
    listener = ChangeListener(services.store, wanted, changed)
    listener.start()
    try:
        # Listening: it nudges both once it is.
        assert changed.wait(10.0, since=0)

        def told(create) -> tuple[int, int]:
            """The generations of the worker's ``wanted`` before and as it hears of ``create``."""
            before, heard = wanted.generation, changed.generation
            create()
            assert changed.wait(10.0, since=heard)
            return before, wanted.generation

        before, at_notice = told(lambda: services.databases.create(LOCAL_ADMIN, CreateRequest(name="first")))
        assert at_notice == before
        assert wanted.wait(5.0, since=before)
        before, at_notice = told(lambda: services.databases.create(LOCAL_ADMIN, CreateRequest(name="second")))
        assert at_notice > before
    finally:
        listener.stop()


def test_a_claimed_server_never_returns_to_the_pool(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    created = services.databases.create(LOCAL_ADMIN)
    services.databases.delete(LOCAL_ADMIN, created.id)
    reconciler.run_once(wait=True)
    assert services.databases.get(LOCAL_ADMIN, created.id).status == Status.DELETED
    assert created.id not in runtime.servers
    assert created.id not in {m.id for m in members(services)}


def test_a_failed_claim_falls_back_to_a_cold_start(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    admin = services.server_admin

    def refuse(*_args):
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    # Only a claim that asks for more than the stocked role talks to the server.
    admin.configure, original = refuse, admin.configure
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(parameters={"work_mem": "8MB"}))
    admin.configure = original
    assert created.status == Status.PENDING and created.tenant == "default"
    assert created.id not in {m.id for m in members(services, Status.READY)}
    reconciler.run_once(wait=True)
    assert services.databases.get(LOCAL_ADMIN, created.id).status == Status.READY
    # The failed member is gone, and the pool is full again.
    reconciler.run_once(wait=True)
    assert len(members(services, Status.READY)) == 2
    assert services.databases.list(LOCAL_ADMIN).total == 1


def test_a_failed_claim_of_a_member_finished_meanwhile_keeps_it(pooled):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    admin = services.server_admin

    def finished_meanwhile(*_args):
        # A reconciler took the claimed member over and finished it first.
        with services.store.read() as session:
            claimed = session.query(Database).filter(Database.status == Status.PROVISIONING).one()
        services.records.transition(claimed.id, {Status.PROVISIONING}, status=Status.READY)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    admin.configure, original = finished_meanwhile, admin.configure
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(parameters={"work_mem": "8MB"}))
    admin.configure = original
    assert created.status == Status.READY and created.tenant == "default"
    # No second database for the same create.
    assert services.databases.list(LOCAL_ADMIN).total == 1


def test_a_plain_claim_asks_the_server_nothing(pooled, runtime, monkeypatch):
    services, reconciler = pooled
    reconciler.run_once(wait=True)

    def no_round_trip(*_args):
        raise AssertionError("a plain claim must not talk to the server")

    for name in ("check", "ensure_tenant_role", "configure", "set_password"):
        monkeypatch.setattr(services.server_admin, name, no_round_trip)
    created = services.databases.create(LOCAL_ADMIN, CreateRequest(name="quick"))
    assert created.status == Status.READY and set(created.phase_timings) == {"claim"}


def test_a_warm_server_that_died_is_never_handed_out(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    for member in members(services, Status.READY):
        runtime.stop_server(member.id)
    created = services.databases.create(LOCAL_ADMIN)
    assert created.status == Status.PENDING and created.tenant == "default"
    assert {m.id for m in members(services)}.isdisjoint({created.id})


def test_a_warm_server_whose_machine_is_away_is_replaced(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    lost, kept = members(services, Status.READY)
    runtime.away.add(lost.id)
    reconciler.run_once(wait=True)  # drift: the lost one is unavailable
    assert {m.id: m.status for m in members(services)}[lost.id] == Status.UNAVAILABLE
    # The next pass retires it (a pool member is nobody's data, and it holds
    # a port) and stocks another; its data goes once its machine answers.
    reconciler.run_once(wait=True)
    reconciler.run_once(wait=True)
    assert {m.id: m.status for m in members(services)}[lost.id] == Status.DELETING
    ready = members(services, Status.READY)
    assert len(ready) == 2 and lost.id not in {m.id for m in ready}


def test_parallel_creates_each_claim_a_different_server(pooled):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        created = list(pool.map(lambda _: services.databases.create(LOCAL_ADMIN), range(4)))
    claimed = [c for c in created if c.phase_timings.get("claim") is not None]
    cold = [c for c in created if c.status == Status.PENDING]
    assert len(claimed) == 2 and len(cold) == 2
    assert len({c.id for c in created}) == 4 and len({c.host_port for c in created}) == 4


def test_claims_count_against_the_quota(pooled):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    services.tenants.create_token("small")
    services.tenants.set_limit("small", 1)
    small = Principal(tenant="small")
    services.databases.create(small)
    with pytest.raises(QuotaExceeded, match="1 of 1"):
        services.databases.create(small)
    assert len(members(services, Status.READY)) == 1


def test_an_overstocked_pool_is_trimmed_to_its_size(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    # As if a second worker had stocked at the same moment.
    for _ in range(2):
        services.registry.add(POOL_TENANT, NewDatabase("17"), services.vault.encrypt("x"), "service")
    reconciler.run_once(wait=True)
    reconciler.run_once(wait=True)
    assert len(members(services, Status.READY)) == 2
    assert len(runtime.servers) == 2


# -- a template's warm clones are its tenant's ---------------------------------------


def held(services, tenant: str) -> int:
    """The servers ``tenant`` holds, counted apart from the code under test:
    its records that are not deleted, and the pool's clones of its templates."""
    with services.store.read() as session:
        mine = set(session.scalars(select(Template.id).where(Template.tenant == tenant)))
        return sum(
            1 for r in session.query(Database).filter(Database.status != Status.DELETED)
            if r.tenant == tenant or (r.tenant == POOL_TENANT and r.template_id in mine)
        )


def template_members(services, template_id: str) -> list[Database]:
    with services.store.read() as session:
        return session.query(Database).filter(
            Database.tenant == POOL_TENANT, Database.template_id == template_id,
            Database.status != Status.DELETED,
        ).all()


def test_a_tenant_at_its_quota_holds_no_more_servers_however_it_uses_templates(services, reconciler, runtime):
    services.tenants.create_token("small")
    services.tenants.set_limit("small", 1)
    small = Principal(tenant="small")
    template, _builder = services.templates.begin(small, "k", None)
    settle(services, reconciler)
    with pytest.raises(QuotaExceeded, match="ask for at most 1"):
        services.templates.finalize(small, "k", templates.MAX_POOL)
    unchanged = services.templates.get(small, "k")
    assert unchanged.status == TemplateStatus.BUILDING and unchanged.snapshot_id is None
    # One warm clone fits: the template's own database goes once its snapshot is taken.
    services.templates.finalize(small, "k", 1)
    for _ in range(4):
        settle(services, reconciler, passes=1)
        assert held(services, "small") <= 1
    assert len(template_members(services, template.id)) == 1
    # The clone it holds is the one database it may have: a create from the template claims it...
    clone = services.databases.create(small, CreateRequest(template="k"))
    assert clone.tenant == "small" and "claim" in clone.phase_timings
    # ...and the pool waits for room that never comes.
    settle(services, reconciler)
    assert template_members(services, template.id) == []
    for source in (None, "k"):
        with pytest.raises(QuotaExceeded, match="1 of 1"):
            services.databases.create(small, CreateRequest(template=source))
    assert held(services, "small") == 1 and len(runtime.servers) == 1


def test_a_templates_pool_is_stocked_with_what_fits_in_its_tenants_limit(services, reconciler, runtime):
    services.tenants.create_token("acme")
    services.tenants.set_limit("acme", 3)
    acme = Principal(tenant="acme")
    template, _builder = services.templates.begin(acme, "k", None)
    settle(services, reconciler)
    services.templates.finalize(acme, "k", 2)
    # Before the pool is stocked, the tenant's own creates take two of the three places.
    services.databases.create(acme)
    services.databases.create(acme)
    settle(services, reconciler, passes=6)
    assert len(template_members(services, template.id)) == 1
    assert held(services, "acme") == 3 == services.tenants.quota("acme")[0]
    (summary,) = [s for s in services.tenants.summaries() if s.name == "acme"]
    assert summary.live == 3
    # A lower limit: the warm clone goes, nobody's data yet; the tenant's own stay.
    services.tenants.set_limit("acme", 2)
    settle(services, reconciler)
    assert template_members(services, template.id) == []
    assert held(services, "acme") == 2 and len(runtime.servers) == 2


def test_a_bad_setting_value_costs_no_warm_server(pooled, runtime):
    services, reconciler = pooled
    reconciler.run_once(wait=True)
    warm = {m.id for m in members(services, Status.READY)}
    with pytest.raises(ValidationError, match="work_mem"):
        services.databases.create(LOCAL_ADMIN, CreateRequest(parameters={"work_mem": "lots"}))
    assert {m.id for m in members(services, Status.READY)} == warm
