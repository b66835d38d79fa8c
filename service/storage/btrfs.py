"""Data on a btrfs pool: each server's data a subvolume, snapshots and clones thin.

A new server's data is a snapshot of its image's golden subvolume (filled
once from the golden image: see ``golden``), so it costs no file. A snapshot
of a server, a clone of a snapshot, a reset and a template's warm clone are
subvolume snapshots too: constant time and no disk until written, whatever
the data's size. The source keeps running: the copy is of one instant, which
PostgreSQL recovers on the copy's first start like a crash.

The engine mounts a subvolume as a local volume that binds its path, so the
engine keeps and removes volumes as for any backend. Data from before the
pool (a volume of the engine's own) stays with ``OverlayStorage``, and a
snapshot of it is copied into the pool.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta
from pathlib import Path

from ..errors import DataLost, NotFound, ServerFailed
from ..runtime.engine import Engine
from ..runtime.protocol import PGDATA, ServerSpec, StorageReport, labels_for, volume_name
from .golden import GOLDEN_HOME, GOLDEN_PGDATA, LABEL_GOLDEN_OF
from .overlay import OverlayStorage
from .pool import Pool
from .protocol import ServerData

log = logging.getLogger(__name__)

# On a volume that binds a subvolume of the pool: its path.
LABEL_SUBVOLUME = "io.dbprov.subvolume"
# On such a volume, "golden" if it holds a golden copy's home (the data
# directory is its data/); else its root is the data directory.
LABEL_LAYOUT = "io.dbprov.layout"
_GOLDEN_LAYOUT = "golden"
# How old data no volume binds must be before a prune removes it.
_ORPHAN_AGE = timedelta(minutes=10)


class BtrfsStorage:
    """A ``StorageBackend`` on a btrfs ``Pool`` the engine's host mounts."""

    def __init__(self, engine: Engine, instance: str, pool: Pool, reason: str, golden: bool = True) -> None:
        self.engine = engine
        self.instance = instance
        self.pool = pool
        # Why this backend: the pool's origin, for /readyz.
        self.reason = reason
        # Golden images, and the data from before the pool.
        self.volumes = OverlayStorage(engine, instance, golden)
        self._golden_lock = threading.Lock()

    @property
    def _api(self):
        return self.engine.client.api

    def prepare(self, spec: ServerSpec, image: dict) -> ServerData:
        found = self.engine.volume(volume_name(spec.database_id))
        if found is not None and LABEL_SUBVOLUME not in (found.get("Labels") or {}):
            return self.volumes.prepare(spec, image)
        golden = self.volumes.golden_image(spec, image) if self.volumes.golden else None
        made = found is None
        if made:
            found = self._new_data(spec.database_id, golden.image if golden else None)
        labels = found.get("Labels") or {}
        if not Path(labels[LABEL_SUBVOLUME]).is_dir():
            # Its volume is left, its data is not: a server on it would start empty.
            raise DataLost(f"the data of {spec.database_id} is gone from the storage pool {self.pool.root}")
        name = volume_name(spec.database_id)
        if labels.get(LABEL_LAYOUT) == _GOLDEN_LAYOUT:
            volumes, pgdata = {name: {"bind": GOLDEN_HOME, "mode": "rw"}}, GOLDEN_PGDATA
        else:
            # A copy: like a volume of its own files under OverlayStorage.
            pgdata = GOLDEN_PGDATA if golden else PGDATA
            volumes = {name: {"bind": pgdata, "mode": "rw"}}
        initialised = golden is not None or labels.get(LABEL_LAYOUT) == _GOLDEN_LAYOUT
        return ServerData(
            spec.database_id, golden.image if golden else spec.image, volumes, pgdata, initialised, made=made
        )

    def confirm(self, data: ServerData, container_id: str) -> None:
        self.volumes.confirm(data, container_id)

    def has_data(self, database_id: str) -> bool:
        return self.volumes.has_data(database_id)

    def with_data(self) -> set[str]:
        return self.volumes.with_data()

    def remove(self, database_id: str) -> None:
        self.volumes.remove(database_id)
        # Also a subvolume that a crash left before its volume was made.
        self.pool.delete(volume_name(database_id))

    def copy(self, source_id: str, target_id: str, image: str) -> int:
        source = self.engine.volume(volume_name(source_id))
        if source is None:
            raise NotFound(f"{source_id} has no data to copy")
        self.pool.check_room(f"a copy of {source_id}")
        labels = source.get("Labels") or {}
        if LABEL_SUBVOLUME not in labels:
            # Data from before the pool: copied into it, once.
            self._volume(target_id, self.pool.create(volume_name(target_id)), layout=None)
            try:
                return self.volumes.copy(source_id, target_id, image)
            except Exception:
                self.remove(target_id)
                raise
        path = self.pool.snapshot(Path(labels[LABEL_SUBVOLUME]), volume_name(target_id))
        layout = labels.get(LABEL_LAYOUT)
        data = path / "data" if layout == _GOLDEN_LAYOUT else path
        # A running server's lock file: the copy's server is another.
        (data / "postmaster.pid").unlink(missing_ok=True)
        self._volume(target_id, path, layout)
        return _size(data)

    def copies_live(self, database_id: str) -> bool:
        volume = self.engine.volume(volume_name(database_id))
        return volume is not None and LABEL_SUBVOLUME in (volume.get("Labels") or {})

    def report(self) -> StorageReport:
        return StorageReport("btrfs", self.reason, str(self.pool.root), self.pool.free(), self.pool.size())

    def prune_caches(self) -> list[str]:
        removed = self.volumes.prune_caches()
        # Data no volume binds: left by a crash between the two, or by a
        # volume removed behind the service's back. Volume names are the
        # engine's, so this holds for every installation sharing the pool;
        # a young one may be a copy whose volume is being made.
        named = {volume["Name"] for volume in self._api.volumes().get("Volumes") or []}
        for name in self.pool.orphans(named, _ORPHAN_AGE):
            self.pool.delete(name)
            removed.append(str(self.pool.path(name)))
        # A golden subvolume is used only to make new data: the data made
        # from it shares its blocks but not its life.
        kept = {tag.partition(":")[2] for tag in self._golden_tags()}
        for name in self.pool.names("golden") - kept:
            self.pool.delete(name, "golden")
            removed.append(str(self.pool.path(name, "golden")))
        return removed

    # -- new data ------------------------------------------------------------------

    def _new_data(self, database_id: str, golden_image: str | None) -> dict:
        """The data volume of ``database_id``: a snapshot of the golden subvolume,
        or an empty subvolume for the image's initdb."""
        name = volume_name(database_id)
        if golden_image is None:
            return self._volume(database_id, self.pool.create(name), layout=None)
        base = self._golden_subvolume(golden_image)
        return self._volume(database_id, self.pool.snapshot(base, name), _GOLDEN_LAYOUT)

    def _golden_subvolume(self, image: str) -> Path:
        """The golden image's home as a subvolume, filled once (the engine copies
        an image's files into an empty volume a container mounts)."""
        key = image.partition(":")[2]
        path = self.pool.path(key, "golden")
        with self._golden_lock:
            if path.is_dir():
                return path
            filling = f"{key}-{os.getpid()}"
            self.pool.delete(filling, "golden")
            volume = f"dbprov-golden-{filling}"
            # Labelled as the golden image's, so that what a crash leaves is known.
            labels = {LABEL_GOLDEN_OF: image}
            self._api.create_volume(
                name=volume, driver="local", labels=labels,
                driver_opts={"type": "none", "o": "bind", "device": str(self.pool.create(filling, "golden"))},
            )
            try:
                container = self._api.create_container(
                    image, command=["true"], network_disabled=True, labels=labels,
                    host_config=self._api.create_host_config(binds=[f"{volume}:{GOLDEN_HOME}:rw"]),
                )
                self.engine.remove_container(container["Id"])
            finally:
                self.engine.remove_volume(volume)
            filled = self.pool.path(filling, "golden")
            if not (filled / "data" / "PG_VERSION").is_file():
                self.pool.delete(filling, "golden")
                raise ServerFailed(f"the golden image {image} did not fill its subvolume")
            # Only a whole one has its final name.
            try:
                filled.rename(path)
            except OSError:
                if not path.is_dir():
                    raise
                # Another process's came first: the same files.
                self.pool.delete(filling, "golden")
            log.info("golden subvolume %s made", path)
            return path

    def _volume(self, database_id: str, path: Path, layout: str | None) -> dict:
        """The engine's volume that binds the subvolume ``path``."""
        labels = {**labels_for(self.instance, database_id), LABEL_SUBVOLUME: str(path)}
        if layout:
            labels[LABEL_LAYOUT] = layout
        return self._api.create_volume(
            name=volume_name(database_id),
            driver="local",
            driver_opts={"type": "none", "o": "bind", "device": str(path)},
            labels=labels,
        )

    def _golden_tags(self) -> list[str]:
        tags = []
        for found in self._api.images(filters={"reference": "dbprov-golden"}):
            tags.extend(found.get("RepoTags") or [])
        return tags


def _size(path: Path) -> int:
    """The data's size in bytes, as a copy would take: its files' lengths."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for file in files:
            try:
                total += os.lstat(os.path.join(folder, file)).st_size
            except FileNotFoundError:
                continue
    return total
