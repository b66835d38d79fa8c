"""Parsing DBPROV_* variables."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import SettingsError
from service.settings import DECLARATIONS, Settings, settings_table_markdown
from service.store.crypto import generate_key, load_vault

ROOT = Path(__file__).parent.parent


def test_defaults(tmp_path):
    settings = Settings.from_env({"DBPROV_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'dbprov.sqlite3'}"
    assert settings.port_range == (15432, 16431)
    assert settings.bind_address == "127.0.0.1"
    assert settings.public_host == "localhost"
    assert settings.images == {"15": "postgres:15", "16": "postgres:16", "17": "postgres:17"}
    assert settings.default_version == "17"
    assert settings.ready_timeout == 60.0
    assert settings.effective_probe_host == "127.0.0.1"
    assert settings.retry_budget == 600.0
    assert settings.pull_images is True


def test_built_directly_the_defaults_are_those_of_the_environment(tmp_path):
    from_env = Settings.from_env({"DBPROV_DATA_DIR": str(tmp_path)})
    assert Settings(data_dir=tmp_path, database_url=from_env.database_url) == from_env


def test_default_data_dir_is_per_user():
    settings = Settings.from_env({})
    assert "dbprov" in settings.data_dir.parts and settings.data_dir.is_absolute()


def test_values_are_parsed():
    settings = Settings.from_env(
        {
            "DBPROV_DATABASE_URL": "postgresql+psycopg://u:p@db/meta",
            "DBPROV_PORT_RANGE": "20000 - 20099",
            "DBPROV_BIND_ADDRESS": "0.0.0.0",
            "DBPROV_PUBLIC_HOST": "db.example.internal",
            "DBPROV_IMAGES": "16=registry.local/pg:16, 17=postgres:17",
            "DBPROV_DEFAULT_VERSION": "16",
            "DBPROV_READY_TIMEOUT": "12.5",
            "DBPROV_INSTANCE": "ci-7",
            "DBPROV_RETRY_BUDGET": "30",
            "DBPROV_PULL_IMAGES": "no",
        }
    )
    assert settings.database_url == "postgresql+psycopg://u:p@db/meta"
    assert settings.port_range == (20000, 20099)
    assert settings.images == {"16": "registry.local/pg:16", "17": "postgres:17"}
    assert settings.default_version == "16" and settings.ready_timeout == 12.5
    assert settings.instance == "ci-7"
    assert settings.retry_budget == 30.0 and settings.pull_images is False
    # A wildcard bind is reached over loopback.
    assert settings.effective_probe_host == "127.0.0.1"


@pytest.mark.parametrize(
    "variable, value",
    [
        ("DBPROV_PORT_RANGE", "abc"),
        ("DBPROV_PORT_RANGE", "16000-15000"),
        ("DBPROV_PORT_RANGE", "0-10"),
        ("DBPROV_PORT_RANGE", "65000-70000"),
        ("DBPROV_BIND_ADDRESS", "localhost"),
        ("DBPROV_IMAGES", "postgres:17"),
        ("DBPROV_IMAGES", "x=postgres:17"),
        ("DBPROV_DEFAULT_VERSION", "14"),
        ("DBPROV_READY_TIMEOUT", "soon"),
        ("DBPROV_READY_TIMEOUT", "-1"),
        ("DBPROV_RECONCILE_INTERVAL", "0"),
        ("DBPROV_MAX_PARALLEL", "2.5"),
        ("DBPROV_INSTANCE", "has space"),
        ("DBPROV_SECRET_KEY", "not-a-fernet-key"),
        ("DBPROV_TENANT_QUOTA", "0"),
        ("DBPROV_TENANT_PORT_SHARE", "0"),
        ("DBPROV_TENANT_PORT_SHARE", "1.5"),
        ("DBPROV_TENANT_PORT_SHARE", "half"),
        ("DBPROV_TENANT_TEMPLATES", "0"),
        ("DBPROV_RATE_LIMIT", "many"),
        ("DBPROV_ALLOW_SUPERUSER", "perhaps"),
        ("DBPROV_MEMORY_LIMIT", "lots"),
        ("DBPROV_POOL_SIZE", "17=x"),
        ("DBPROV_POOL_SIZE", "9=1"),
        ("DBPROV_POOL_SIZE", "9=0"),
        ("DBPROV_POSTGRES_ARGS", "--single"),
        ("DBPROV_POSTGRES_ARGS", "-c shared_buffers"),
        ("DBPROV_POSTGRES_ARGS", "-c 'unclosed"),
        ("DBPROV_RETRY_BUDGET", "0"),
        ("DBPROV_PULL_IMAGES", "sometimes"),
    ],
)
def test_invalid_values_name_the_variable(variable, value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(variable)


def test_invalid_setting_stops_the_command_naming_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service", "db", "upgrade"],
        env={"DBPROV_DATA_DIR": str(tmp_path), "DBPROV_PORT_RANGE": "nope", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "DBPROV_PORT_RANGE" in result.stderr


def test_pool_sizes_and_server_options():
    both = Settings.from_env({"DBPROV_POOL_SIZE": "2", "DBPROV_IMAGES": "15=postgres:15,17=postgres:17"})
    assert both.pool_sizes == {"15": 2, "17": 2}
    assert Settings.from_env({"DBPROV_POOL_SIZE": "0"}).pool_sizes == {}
    assert Settings.from_env({"DBPROV_POOL_SIZE": "16=0,17=1"}).pool_sizes == {"17": 1}
    one = Settings.from_env({"DBPROV_POOL_SIZE": "17=3"})
    assert one.pool_sizes == {"17": 3}
    assert Settings.from_env({}).pool_sizes == {}
    options = Settings.from_env({"DBPROV_POSTGRES_ARGS": "-c shared_buffers=16MB -c fsync=off"})
    assert options.postgres_args == ("-c", "shared_buffers=16MB", "-c", "fsync=off")


def test_secret_key_is_never_echoed_and_never_in_repr():
    key = generate_key()
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DBPROV_SECRET_KEY": f"{key},{key[:-3]}"})
    assert key[:-3] not in str(caught.value) and "key 2" in str(caught.value)
    settings = Settings.from_env({"DBPROV_SECRET_KEY": key, "DBPROV_DATABASE_URL": "postgresql://u:pw@h/db"})
    assert key not in repr(settings) and "pw" not in repr(settings)


def test_embedded_default_makes_a_private_key_file_once(tmp_path):
    settings = Settings.from_env({"DBPROV_DATA_DIR": str(tmp_path)})
    first = load_vault(settings)
    key_file = tmp_path / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    token = first.encrypt("secret")
    assert load_vault(settings).decrypt(token) == "secret"


def test_a_deployed_store_needs_a_key(tmp_path):
    settings = Settings.from_env(
        {"DBPROV_DATA_DIR": str(tmp_path), "DBPROV_DATABASE_URL": "postgresql+psycopg://h/db"}
    )
    with pytest.raises(SettingsError) as caught:
        load_vault(settings)
    assert caught.value.variable == "DBPROV_SECRET_KEY"
    assert not (tmp_path / "secret.key").exists()


def test_a_key_file_that_holds_no_key_is_refused(tmp_path):
    (tmp_path / "secret.key").write_text("not-a-key\n")
    with pytest.raises(SettingsError) as caught:
        load_vault(Settings.from_env({"DBPROV_DATA_DIR": str(tmp_path)}))
    assert caught.value.variable == "DBPROV_SECRET_KEY" and "secret.key" in str(caught.value)


def test_settings_do_not_import_the_crypto_module():
    # crypto's load_vault takes Settings; the other direction would close a circle.
    code = "import sys, service.settings; print('service.store.crypto' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_the_readme_table_lists_the_declared_settings():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(DBPROV_\w+)` \| (.+?) \| (.+) \|$", section, re.MULTILINE)
    declared = [(d.variable, d.shown, d.doc) for d in DECLARATIONS.values()]
    regenerate = (
        "README.md's settings table differs from the declarations in service/settings.py; print "
        "the table with: python -c 'from service.settings import settings_table_markdown as t; "
        "print(t(), end=\"\")'"
    )
    assert rows == declared, regenerate
    assert settings_table_markdown() in section, regenerate
