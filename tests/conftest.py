"""Shared fixtures: fast ones on a fake runtime, and the metadata store on each backend."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.app import create_app
from service.composition import Services
from service.domain.tenancy import LOCAL_ADMIN
from service.reconciler.loop import Reconciler
from service.settings import Settings
from service.store.crypto import Vault, generate_key
from service.store.engine import Store

from .fakes import FakePostgres, FakeRuntime

# A Django project that tests/integration/test_compat.py hands to Django's own
# test runner and to pytest-django: not tests of this suite.
collect_ignore = ["compat"]

# A PostgreSQL server the metadata tests may create databases on, e.g.
# postgresql+psycopg://postgres:secret@127.0.0.1:5432/postgres (.ci/run starts one).
POSTGRES_URL = os.environ.get("DBPROV_TEST_POSTGRES_URL")

BACKENDS = ["sqlite", "postgresql"]


def _fresh_postgres_database() -> tuple[str, callable]:
    """A new, empty database on the test server, and a function that drops it."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"dbprov_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False), drop


@pytest.fixture
def postgres_url():
    """An empty database on the PostgreSQL test server, dropped afterwards."""
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("DBPROV_TEST_POSTGRES_URL is not set: CI must test the PostgreSQL backend")
        pytest.skip("DBPROV_TEST_POSTGRES_URL is not set")
    url, drop = _fresh_postgres_database()
    yield url
    drop()


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path: Path):
    """An empty metadata database: a SQLite file, then a database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meta.sqlite3'}"
    return request.getfixturevalue("postgres_url")


KEY = generate_key()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        secret_keys=(KEY,),
        tenant_quota=20,
        rate_limit=1000,
        database_url=database_url,
        data_dir=tmp_path,
        port_range=(20000, 20009),
        images={"15": "postgres:15", "17": "postgres:17"},
        default_version="17",
        ready_timeout=2.0,
        request_timeout=5.0,
        reconcile_interval=0.05,
        instance="test",
    )


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def services(settings: Settings, runtime: FakeRuntime):
    """The service on a fake engine; authentication on, as deployed."""
    services = Services(
        settings, Store(settings.database_url), runtime, Vault(settings.secret_keys),
        server_admin=FakePostgres(runtime),
    )
    services.store.upgrade(services.vault)
    yield services
    services.store.dispose()


@pytest.fixture
def reconciler(services: Services):
    """A reconciler on the fake runtime, not started: tests drive ``run_once``."""
    reconciler = services.reconciler()
    yield reconciler
    reconciler.stop()


@pytest.fixture
def local(services: Services):
    """What `dbprov serve --no-auth` makes every caller: admin of the default tenant."""
    return LOCAL_ADMIN


@pytest.fixture
def client(services: Services):
    """A client of the API with authentication off, for tests about everything else."""
    services.auth_required = False
    return create_app(services).test_client()


@pytest.fixture
def running(reconciler: Reconciler) -> Reconciler:
    """The reconciler looping in the background, as under ``dbprov serve``."""
    reconciler.start()
    return reconciler
