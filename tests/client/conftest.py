"""Fast tests of the client distribution against an in-memory stand-in of the API."""

from __future__ import annotations

import os

import pytest

from dbprov_client import Client

from .fake import FakeDbprov


@pytest.fixture
def fake():
    server = FakeDbprov().start()
    yield server
    server.close()


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No DBPROV_URL, DBPROV_TOKEN or stored login of the person running the tests."""
    monkeypatch.delenv("DBPROV_URL", raising=False)
    monkeypatch.delenv("DBPROV_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


@pytest.fixture
def client(fake, isolated):
    """A client of the fake whose retry waits are recorded, not slept."""
    client = Client(fake.url)
    client.waits = []
    client.sleep = client.waits.append
    yield client
    client.close()


@pytest.fixture
def backed(fake):
    """The fake, each of whose databases is a real one on the PostgreSQL test
    server (DBPROV_TEST_POSTGRES_URL): for what connects to them."""
    from ..conftest import POSTGRES_URL

    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("DBPROV_TEST_POSTGRES_URL is not set: CI must test against PostgreSQL")
        pytest.skip("DBPROV_TEST_POSTGRES_URL is not set")
    fake.postgres = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://", 1)
    return fake
