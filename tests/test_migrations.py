"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from service.domain.models import Base
from service.store.engine import Store, alembic_config


def test_migrations_match_the_models(database_url):
    store = Store(database_url)
    store.upgrade()
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    store.dispose()
    assert differences == []


def test_downgrade_and_upgrade_again(database_url):
    store = Store(database_url)
    store.upgrade()
    with store.engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert "databases" not in inspect(store.engine).get_table_names()
    store.upgrade()
    assert "databases" in inspect(store.engine).get_table_names()
    store.upgrade()  # a second run has nothing to do
    store.dispose()


def test_the_phase_histogram_starts_from_the_records_phases(services, reconciler):
    from service.domain.models import PhaseHistogram
    from service.domain.tenancy import Principal

    services.databases.create(Principal(tenant="default"))
    reconciler.run_once(wait=True)
    with services.store.read() as session:
        before = session.execute(select(PhaseHistogram.phase, PhaseHistogram.bucket, PhaseHistogram.count)).all()
    assert ("total", 12, 1) in before
    with services.store.engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0007")
    services.store.upgrade()
    with services.store.read() as session:
        after = session.execute(select(PhaseHistogram.phase, PhaseHistogram.bucket, PhaseHistogram.count)).all()
    assert sorted(after) == sorted(before)
