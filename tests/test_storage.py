"""Which storage backend the service takes, and why: fast, with the machine's facts faked."""

from __future__ import annotations

import dataclasses

import pytest

from service import composition
from service.errors import SettingsError
from service.settings import Settings
from service.storage import pool as pool_module
from service.storage.pool import open_pool


def test_copy_is_taken_when_asked_for_and_names_the_setting(settings: Settings, monkeypatch):
    monkeypatch.setattr(composition, "open_pool", lambda *_: pytest.fail("no pool is looked for"))
    assert composition._pool(dataclasses.replace(settings, storage="copy")) == (None, "DBPROV_STORAGE=copy")


def test_auto_falls_back_to_copies_saying_why_and_btrfs_refuses_to_start(settings: Settings, monkeypatch):
    monkeypatch.setattr(composition, "open_pool", lambda *_: (None, "btrfs-progs is not installed"))
    assert composition._pool(dataclasses.replace(settings, storage="auto")) == (None, "btrfs-progs is not installed")
    with pytest.raises(SettingsError, match="DBPROV_STORAGE: btrfs is asked for, but there is no pool: btrfs-progs"):
        composition._runtime(dataclasses.replace(settings, storage="btrfs", runtime="docker"))


@pytest.mark.parametrize(
    "which, euid, engine, why",
    [
        (lambda name: None, 0, True, "btrfs-progs is not installed"),
        (lambda name: f"/usr/bin/{name}", 1000, True, "not root"),
        (lambda name: f"/usr/bin/{name}", 0, False, "the engine does not run beside the service"),
        (lambda name: None if name == "mkfs.btrfs" else f"/usr/bin/{name}", 0, True, "mkfs.btrfs is not installed"),
    ],
)
def test_no_pool_is_made_where_it_cannot_be_and_the_reason_says_what_is_missing(
    tmp_path, monkeypatch, which, euid, engine, why
):
    monkeypatch.setattr(pool_module.shutil, "which", which)
    monkeypatch.setattr(pool_module.os, "geteuid", lambda: euid)
    monkeypatch.setattr(pool_module, "_engine_beside", lambda: engine)
    monkeypatch.setattr(pool_module, "_run", lambda *command: pytest.fail(f"ran {command}"))
    pool, reason = open_pool(tmp_path / "pool", 2**30, 2**20)
    assert pool is None and why in reason
    assert not (tmp_path / "pool.img").exists()


def test_a_remote_engine_gets_no_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.0.0.5:2376")
    pool, reason = open_pool(tmp_path / "pool", 2**30, 2**20)
    assert pool is None and "DOCKER_HOST=tcp://10.0.0.5:2376" in reason


def test_sizes_are_read_in_bytes():
    settings = Settings.from_env({"DBPROV_STORAGE_POOL_SIZE": "64g", "DBPROV_STORAGE_MIN_FREE": "512m"})
    assert (settings.storage_pool_size, settings.storage_min_free) == (64 * 2**30, 512 * 2**20)
    with pytest.raises(SettingsError, match="DBPROV_STORAGE"):
        Settings.from_env({"DBPROV_STORAGE": "zfs"})
