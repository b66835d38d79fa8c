"""A btrfs pool: the directory whose subvolumes hold servers' and snapshots' data.

A subvolume snapshot shares every block with its source until one of them
writes it: it is made in constant time, whatever the data's size, and costs
no disk until written. It is also atomic, so a running server's snapshot is
crash-consistent (write-ahead log and data files of the same instant).

The pool is a btrfs directory the operator names, or, where the service
runs as root on the engine's host, a sparse loop file it makes and mounts
itself on first use (``mkfs.btrfs``, ``mount -o loop``). ``open_pool`` says
why it has none, so that the service runs on copies and says so.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..errors import EngineError, InsufficientStorage

log = logging.getLogger(__name__)

_BTRFS_MAGIC = "btrfs"


class Pool:
    """Subvolumes under ``root`` (a directory on btrfs): ``data/<name>`` for
    servers' and snapshots' data, ``golden/<name>`` for initialised bases."""

    def __init__(self, root: Path, min_free: int, backing: Path | None = None) -> None:
        self.root = root
        # Bytes that must stay free after a snapshot or a clone is asked for:
        # a full btrfs fails its servers' writes, so none is made that close.
        self.min_free = min_free
        # The loop file the pool lives in, if the service made it: it is
        # sparse, so the disk under it may fill before the pool does.
        self.backing = backing
        for folder in ("data", "golden"):
            (root / folder).mkdir(exist_ok=True)

    def path(self, name: str, folder: str = "data") -> Path:
        return self.root / folder / name

    def create(self, name: str, folder: str = "data") -> Path:
        path = self.path(name, folder)
        if not path.exists():
            _run("btrfs", "subvolume", "create", str(path))
        return path

    def snapshot(self, source: Path, name: str, folder: str = "data") -> Path:
        """A writable snapshot of ``source`` named ``name``; one left by a crash is made again."""
        target = self.path(name, folder)
        self.delete(name, folder)
        _run("btrfs", "subvolume", "snapshot", str(source), str(target))
        return target

    def delete(self, name: str, folder: str = "data") -> None:
        path = self.path(name, folder)
        if path.exists():
            _run("btrfs", "subvolume", "delete", str(path))

    def names(self, folder: str = "data") -> set[str]:
        return {entry.name for entry in (self.root / folder).iterdir()}

    def orphans(self, bound: set[str], older_than: timedelta) -> set[str]:
        """The data no volume binds (``bound``: the names the engine has), made
        longer ago than ``older_than``: younger, a volume may be being made for it."""
        now = datetime.now(timezone.utc)
        return {name for name in self.names() - bound if now - self.made_at(name) > older_than}

    def made_at(self, name: str, folder: str = "data") -> datetime:
        """When the subvolume was made (a snapshot keeps its source's times otherwise)."""
        shown = _run("btrfs", "subvolume", "show", str(self.path(name, folder)))
        found = re.search(r"Creation time:\s+(.+)", shown)
        if found is None:
            raise EngineError(f"btrfs did not say when {name} was made")
        return datetime.strptime(found.group(1).strip(), "%Y-%m-%d %H:%M:%S %z")

    def free(self) -> int:
        """Bytes that can still be written: the pool's, or the disk's under its
        loop file if that is less."""
        free = _free(self.root)
        if self.backing is not None:
            free = min(free, _free(self.backing.parent))
        return free

    def size(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_blocks * stat.f_frsize

    def check_room(self, what: str) -> None:
        check_room(str(self.root), self.free(), self.min_free, what)


def check_room(pool: str, free: int, min_free: int, what: str) -> None:
    """Refuse ``what`` (507) if ``pool`` has less than ``min_free`` bytes free."""
    if free < min_free:
        raise InsufficientStorage(
            f"no room for {what}: the storage pool {pool} has {free // 2**20} MiB free, "
            f"under the {min_free // 2**20} MiB kept free (DBPROV_STORAGE_MIN_FREE)"
        )


def open_pool(root: Path, size: int, min_free: int) -> tuple[Pool | None, str]:
    """The pool at ``root``, made and mounted if need be; or None and why not.

    ``root`` already on btrfs (the operator's mount) is used as it is.
    Otherwise the service makes ``<root>.img`` (sparse, ``size`` bytes) and
    mounts it at ``root``, which needs root on the engine's own host and
    btrfs-progs.
    """
    if not shutil.which("btrfs"):
        return None, "btrfs-progs is not installed (apt install btrfs-progs)"
    image = root.with_name(root.name + ".img")
    if _on_btrfs(root):
        if image.is_file():
            # Mounted by this or another process of the service.
            return Pool(root, min_free, image), f"a loop file {image} the service made, mounted at {root}"
        return Pool(root, min_free), f"the btrfs directory {root}"
    host = os.environ.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        return None, f"the engine is not on this host (DOCKER_HOST={host}): it cannot mount a pool made here"
    if not _engine_beside():
        return None, (
            "the engine does not run beside the service (no dockerd among its processes), so it "
            "would not see a pool mounted here: name in DBPROV_STORAGE_POOL a btrfs directory "
            "that both see at the same path"
        )
    if os.geteuid() != 0:
        return None, f"not root, so no pool can be mounted: name a btrfs directory in DBPROV_STORAGE_POOL (tried {root})"
    if not shutil.which("mkfs.btrfs"):
        return None, "mkfs.btrfs is not installed (apt install btrfs-progs)"
    try:
        root.mkdir(parents=True, exist_ok=True)
        # One process makes and mounts it; the others find it mounted.
        with open(root.with_name(root.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _on_btrfs(root):
                if not image.exists():
                    with open(image, "wb") as file:
                        file.truncate(size)
                    _run("mkfs.btrfs", "--quiet", str(image))
                # discard: blocks freed in the pool are given back to the disk
                # under the loop file, which is sparse.
                _run("mount", "-o", "loop,noatime,discard=async", str(image), str(root))
                log.info("storage pool: %s mounted at %s", image, root)
    except (OSError, EngineError) as exc:
        return None, f"the pool at {root} could not be made: {exc}"
    return Pool(root, min_free, image), f"a loop file {image} the service made, mounted at {root}"


def _on_btrfs(path: Path) -> bool:
    """Whether ``path`` is the root of a mounted btrfs file system, or in one."""
    if not path.is_dir():
        return False
    best, fstype = "", ""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, fstype = point, fields[2]
    return fstype == _BTRFS_MAGIC


def _engine_beside() -> bool:
    """Whether a Docker engine runs in this process's view of the machine, and so
    mounts the same file systems: not so for a service in a container that only
    has the engine's socket."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "dockerd":
                return True
        except OSError:
            continue
    return False


def _free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise EngineError(f"{' '.join(command[:3])} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout
