"""The settings table of service/parameters.py against the servers themselves:
its types, units, ranges and values are each image's pg_settings, and every
verdict it gives on a value is the one ALTER DATABASE ... SET gives."""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import sql

from service.domain.parameters import KNOWN, check_values
from service.domain.requests import DATABASE_PARAMETERS
from service.errors import ValidationError

from .conftest import INSTANCE, free_port

# Its module-scoped fixture is made once: the module runs on one xdist worker.
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("test_parameters")]

VALUES = {
    "work_mem": ["8MB", "64kB", "63kB", "lots", "8mb", "1.5GB", "0x100", " 128 kB ", "2147483648kB", "1TB"],
    "maintenance_work_mem": ["100kB", "1023kB", "64MB"],
    "statement_timeout": ["0", "1234", "1.5s", "2min", "1d", "-1", "30 sec", "25days", "1h"],
    "log_min_duration_statement": ["-1", "-2", "250ms"],
    "temp_buffers": ["100", "99", "800kB", "8MB"],
    "effective_cache_size": ["4GB", "0"],
    "effective_io_concurrency": ["0", "1000", "1001"],
    "default_statistics_target": ["100", "0", "10001"],
    "random_page_cost": ["1.1", "0", "-0.5", "1e3", "1ms", "x"],
    "jit": ["on", "off", "t", "fa", "yes", "n", "1", "0", "o", "maybe", "TRUE"],
    "default_transaction_read_only": ["true", "of", "ye"],
    "synchronous_commit": ["on", "OFF", "local", "remote_apply", "true", "0", "sometimes"],
    "default_transaction_isolation": ["serializable", "Read Committed", "snapshot"],
    "intervalstyle": ["iso_8601", "SQL_STANDARD", "fancy"],
    "datestyle": ["ISO, MDY", "German", "sql, dmy", "ISO, SQL", "MDY, DMY", "weekday"],
    "timezone": ["UTC", "Europe/Berlin", "america/new_york", "+3", "-5.5", "EST5EDT", "Mars/Olympus", "<+03>-3"],
    "search_path": ['"$user", public', "a, b", "app", 'a,,b', '"unterminated'],
}


@pytest.fixture(scope="module", params=sorted(KNOWN))
def server(request, docker_client):
    version = request.param
    port = free_port()
    container = docker_client.containers.run(
        f"postgres:{version}", detach=True, environment={"POSTGRES_PASSWORD": "checks"},
        ports={"5432/tcp": ("127.0.0.1", port)}, labels={"io.dbprov.instance": INSTANCE},
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", password="checks",
                                   dbname="postgres", autocommit=True, connect_timeout=2)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, container.logs().decode()
            time.sleep(0.3)
    yield str(version), conn
    conn.close()
    container.remove(force=True, v=True)


def test_the_table_is_the_servers_pg_settings(server):
    version, conn = server
    rows = conn.execute(
        "SELECT lower(name), vartype, unit, min_val, max_val, enumvals FROM pg_settings WHERE lower(name) = ANY(%s)",
        (sorted(DATABASE_PARAMETERS),),
    ).fetchall()
    assert {row[0] for row in rows} == set(DATABASE_PARAMETERS) == set(KNOWN[int(version)])
    for name, vartype, unit, minimum, maximum, values in rows:
        parameter = KNOWN[int(version)][name]
        assert (parameter.vartype, parameter.unit) == (vartype, unit), name
        if vartype in ("integer", "real"):
            assert (parameter.minimum, parameter.maximum) == (float(minimum), float(maximum)), name
        if vartype == "enum":
            assert set(parameter.values) == set(values), name


def test_every_verdict_is_the_servers(server):
    version, conn = server
    conn.execute("CREATE DATABASE verdicts")
    disagreements = []
    for name, values in VALUES.items():
        for value in values:
            try:
                check_values(version, {name: value})
                ours = True
            except ValidationError:
                ours = False
            try:
                conn.execute(sql.SQL("ALTER DATABASE verdicts SET {} = {}").format(
                    sql.Identifier(name), sql.Literal(value)))
                theirs = True
            except psycopg.Error:
                theirs = False
            if ours != theirs:
                disagreements.append((name, value, ours, theirs))
    assert disagreements == []
