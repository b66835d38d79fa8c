"""Recording databases: port reservation, names, and races between threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy.exc
from sqlalchemy import update

from service.domain.models import Database
from service.domain.requests import CreateRequest
from service.domain.tenancy import LOCAL_ADMIN
from service.errors import Conflict, PortRangeExhausted


def create_many(services, count: int, name=None):
    """Run ``count`` creates at once from threads; results or exceptions."""

    def attempt(_):
        try:
            return services.databases.create(LOCAL_ADMIN, CreateRequest(name=name))
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            return exc

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(attempt, range(count)))


def test_concurrent_creates_get_distinct_ports(services):
    results = create_many(services, 10)
    assert all(isinstance(r, Database) for r in results), results
    assert len({r.host_port for r in results}) == 10
    assert {r.host_port for r in results} == set(range(20000, 20010))


def test_racing_for_the_last_ports_two_win_the_rest_get_503(services):
    earlier = [services.databases.create(LOCAL_ADMIN) for _ in range(8)]
    results = create_many(services, 6)
    winners = [r for r in results if isinstance(r, Database)]
    losers = [r for r in results if not isinstance(r, Database)]
    assert len(winners) == 2
    assert len({r.host_port for r in earlier + winners}) == 10
    assert len(losers) == 4 and all(isinstance(e, PortRangeExhausted) for e in losers)
    assert services.databases.list(LOCAL_ADMIN).total == 10


def test_concurrent_creates_with_one_name_one_wins(services):
    results = create_many(services, 6, name="same")
    assert sum(isinstance(r, Database) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, Database))


def test_the_store_itself_refuses_a_second_holder_of_a_port(services):
    first = services.databases.create(LOCAL_ADMIN)
    second = services.databases.create(LOCAL_ADMIN)
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        with services.store.transaction() as session:
            session.execute(
                update(Database).where(Database.id == second.id).values(host_port=first.host_port)
            )


def test_a_deleted_database_frees_its_port(services, reconciler):
    victim = services.databases.create(LOCAL_ADMIN)
    for _ in range(9):
        services.databases.create(LOCAL_ADMIN)
    with pytest.raises(PortRangeExhausted):
        services.databases.create(LOCAL_ADMIN)
    services.databases.delete(LOCAL_ADMIN, victim.id)
    reconciler.run_once(wait=True)
    assert services.databases.create(LOCAL_ADMIN).host_port == victim.host_port


def test_name_is_reusable_once_deleted(services, reconciler):
    first = services.databases.create(LOCAL_ADMIN, CreateRequest(name="reuse"))
    services.databases.delete(LOCAL_ADMIN, first.id)
    reconciler.run_once(wait=True)
    assert services.databases.create(LOCAL_ADMIN, CreateRequest(name="reuse")).name == "reuse"
