"""Data on Docker volumes: a server's data an overlay on its image's golden volume, or a
volume of its own files (initdb's, or a copy), and snapshots and clones as copies.

A golden volume (``dbprov-golden-<key>-<build>``) is filled once from a
golden image (see ``golden``). A server's data volume is an overlay over it:
its own changes go to a volume of its own (``-upper``), the golden files are
shared and never copied, so making one costs no file at all. Where the engine
cannot mount an overlay, the volume is a full copy instead, which the engine
makes when an empty volume is mounted over the golden image's files.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import NamedTuple

import docker.errors
import requests.exceptions

from ..errors import EngineError, NotFound, ServerFailed, TransientError
from ..runtime.engine import Engine
from ..runtime.protocol import (
    LABEL_DATABASE_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    PGDATA,
    ServerSpec,
    StorageReport,
    labels_for,
    volume_name,
)
from .golden import (
    GOLDEN_HOME,
    GOLDEN_MARK,
    GOLDEN_PGDATA,
    GOLDEN_REPOSITORY,
    LABEL_GOLDEN_BASE,
    LABEL_GOLDEN_OF,
    LABEL_LOWER,
    GoldenFailed,
    builder,
    golden_key,
    golden_labels,
    make_golden,
    prune_all_golden_images,
    prune_golden_images,
)
from .protocol import ServerData

log = logging.getLogger(__name__)

# Where a server on an overlay mounts, read-only, the volumes the overlay is
# made of: the engine then refuses to remove or prune them while it exists.
LAYERS_AT = "/var/lib/dbprov-layers"
# Seconds before a golden image that could not be made is tried again.
_GOLDEN_RETRY = 600.0


class _Golden(NamedTuple):
    """A golden copy: its image, and its volume as the engine describes it
    (None where servers get copies instead of overlays)."""

    image: str
    volume: dict | None


class OverlayStorage:
    """A ``StorageBackend`` on one Docker engine's local volumes."""

    def __init__(self, engine: Engine, instance: str, golden: bool = True, reason: str = "") -> None:
        self.engine = engine
        self.instance = instance
        # Why servers get this backend rather than a pool's thin copies, for /readyz.
        self.reason = reason
        # Whether new servers start on a golden copy rather than running initdb.
        self.golden = golden
        # One golden image made at a time in this process; when each base
        # image's could not be made (its servers initialise as before until
        # _GOLDEN_RETRY has passed).
        self._golden_lock = threading.Lock()
        self._golden_failed: dict[str, float] = {}
        # When each golden key's volume, if missing, may next be made again.
        self._golden_refill: dict[str, float] = {}

    @property
    def _api(self):
        return self.engine.client.api

    def prepare(self, spec: ServerSpec, image: dict) -> ServerData:
        golden = self.golden_image(spec, image) if self.golden else None
        labels = labels_for(self.instance, spec.database_id)
        lower, made = self._data_volume(spec.database_id, labels, golden)
        # Data that begins initialised (a golden copy or an overlay) rather
        # than by the image's own initdb, at its own $PGDATA.
        initialised = golden is not None or lower is not None
        pgdata = GOLDEN_PGDATA if initialised else PGDATA
        return ServerData(
            spec.database_id,
            # An overlay made while golden copies were on runs on the plain image if they are off now.
            golden.image if golden else spec.image,
            self._mounts(spec.database_id, lower, pgdata),
            pgdata,
            initialised,
            lower,
            made,
        )

    def confirm(self, data: ServerData, container_id: str) -> None:
        lower = data.base
        if lower is None or _is_golden(self.engine.volume(lower)):
            return
        # The golden volume went between the look and the create: the
        # engine made an empty one of its name for the mount. A server on
        # it has no data; what a new database stands on is made again.
        self.engine.remove_container(container_id)
        if data.made:
            self.remove(data.database_id)
        if not _is_golden(self.engine.volume(lower)):
            self.engine.remove_volume(lower)
        raise TransientError(f"the golden volume {lower} went while the server of {data.database_id} was made")

    def has_data(self, database_id: str) -> bool:
        return self.engine.volume(volume_name(database_id)) is not None

    def with_data(self) -> set[str]:
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.instance}"]}
        volumes = self._api.volumes(filters=filters).get("Volumes") or []
        return {(v.get("Labels") or {}).get(LABEL_DATABASE_ID) for v in volumes} - {None}

    def remove(self, database_id: str) -> None:
        # The overlay first: the volumes it is made of are in use until it goes.
        for volume in (volume_name(database_id), *_layers(database_id)):
            self.engine.remove_volume(volume)

    def copy(self, source_id: str, target_id: str, image: str) -> int:
        source = self.engine.volume(volume_name(source_id))
        if source is None:
            raise NotFound(f"{source_id} has no data to copy")
        # A copy is a volume of its own files: an overlay holds them in data/.
        inside = "data/" if LABEL_LOWER in (source.get("Labels") or {}) else ""
        self._api.create_volume(name=volume_name(target_id), labels=labels_for(self.instance, target_id))
        container = self.engine.job_container(
            target_id,
            labels_for(self.instance, target_id),
            image,
            # -a keeps owners and modes: the server runs as its own user on
            # them. The size is the copy's, for the snapshot's record.
            ["sh", "-c", f"cp -a /source/{inside}. /target/ && du -sb /target | cut -f1"],
            {
                volume_name(source_id): {"bind": "/source", "mode": "ro"},
                volume_name(target_id): {"bind": "/target", "mode": "rw"},
            },
            network_mode="none",
        )
        try:
            container.start()
            status = container.wait(timeout=3600)
            output = container.logs().decode("utf-8", errors="replace").strip()
        finally:
            self.engine.remove_container(container.id)
        if status.get("StatusCode", -1) != 0 or not output.splitlines()[-1:][0].isdigit():
            raise EngineError(f"copying the data of {source_id} failed: {output}")
        return int(output.splitlines()[-1])

    def copies_live(self, database_id: str) -> bool:
        # A file-by-file copy of a running server's data is of no one instant.
        return False

    def report(self) -> StorageReport:
        return StorageReport("copy", self.reason)

    def prune_caches(self) -> list[str]:
        removed = prune_all_golden_images(self.engine)
        for volume in self._api.volumes(filters={"label": LABEL_GOLDEN_OF}).get("Volumes") or []:
            # A server's container holds the golden volume it stands on;
            # data kept without its server (a failed database) is looked for.
            if self._stood_on(volume["Name"]):
                continue
            try:
                self._api.remove_volume(volume["Name"])
            except docker.errors.APIError:
                continue  # in use after all
            removed.append(volume["Name"])
        return removed

    # -- a server's data volume -------------------------------------------------------

    def _data_volume(
        self, database_id: str, labels: dict[str, str], golden: "_Golden | None"
    ) -> tuple[str | None, bool]:
        """Make the server's data volume if it has none; the golden volume it is
        an overlay on (or None for a volume of its own files), and whether it
        was made now (so holds nothing of the tenant's yet)."""
        found = self.engine.volume(volume_name(database_id))
        if found is not None:
            lower = (found.get("Labels") or {}).get(LABEL_LOWER)
            if lower is not None and not _is_golden(self.engine.volume(lower)):
                # Mounting it by name would make an empty volume in its place.
                raise ServerFailed(
                    f"the golden volume {lower} that the data of {database_id} is an overlay on is gone"
                )
            return lower, False
        if golden is None or golden.volume is None:
            self._api.create_volume(name=volume_name(database_id), labels=labels)
            return None, True
        self._make_overlay(database_id, labels, golden.volume["Name"], golden.volume["Mountpoint"])
        return golden.volume["Name"], True

    def _make_overlay(self, database_id: str, labels: dict[str, str], lower: str, lower_path: str) -> None:
        """The data volume of ``database_id`` as an overlay on the golden volume
        ``lower`` (at ``lower_path`` on the engine's host): no file is copied."""
        # Volumes of their own, so that the engine keeps and removes them (a
        # server mounts them too: see _mounts). The engine answers a create
        # of an existing one with it: what a crash left before the overlay
        # was made (still empty) is used again.
        upper, work = (self._api.create_volume(name=name, labels=labels) for name in _layers(database_id))
        self._api.create_volume(
            name=volume_name(database_id),
            driver="local",
            driver_opts={
                "type": "overlay",
                "device": "overlay",
                "o": f"lowerdir={lower_path},upperdir={upper['Mountpoint']},workdir={work['Mountpoint']}",
            },
            labels={**labels, LABEL_LOWER: lower},
        )

    @staticmethod
    def _mounts(database_id: str, lower: str | None, pgdata: str) -> dict:
        """The volumes of a server: its own data at ``pgdata``, or an overlay
        holding it (at GOLDEN_PGDATA) and, read-only, every volume the overlay
        is made of. The engine knows an overlay's volumes only by these
        mounts: without them it would count them unused, and a `docker volume
        prune` would remove the golden files, or a server's own changes."""
        if lower is None:
            return {volume_name(database_id): {"bind": pgdata, "mode": "rw"}}
        upper, work = _layers(database_id)
        return {
            # nocopy: an overlay is never filled from the image's files.
            volume_name(database_id): {"bind": GOLDEN_HOME, "mode": "rw,nocopy"},
            lower: {"bind": f"{LAYERS_AT}/lower", "mode": "ro,nocopy"},
            upper: {"bind": f"{LAYERS_AT}/upper", "mode": "ro,nocopy"},
            work: {"bind": f"{LAYERS_AT}/work", "mode": "ro,nocopy"},
        }

    # -- golden copies --------------------------------------------------------------

    def golden_image(self, spec: ServerSpec, base: dict) -> "_Golden | None":
        """The golden copy for ``spec``'s image and superuser, made if need be; None
        if it cannot be made (its servers then run initdb, as without one)."""
        key = golden_key(spec, base)
        tag = f"{GOLDEN_REPOSITORY}:{key}"
        if time.monotonic() < self._golden_failed.get(base["Id"], 0.0):
            return None
        with self._golden_lock:
            image = self.engine.image(tag)
            if image is None:
                try:
                    make_golden(self.engine, spec, base, key, self._fill_golden_volume)
                    image = self.engine.image(tag) or {}
                except (docker.errors.APIError, requests.exceptions.RequestException, GoldenFailed) as exc:
                    self._golden_failed[base["Id"]] = time.monotonic() + _GOLDEN_RETRY
                    log.warning(
                        "no golden image for %s (servers on it run initdb, about 1 s more each): %s",
                        spec.image, exc,
                    )
                    return None
                self._prune_golden(spec.image, base["Id"])
                # Its volume was just tried: not again at once.
                self._golden_refill[key] = time.monotonic() + _GOLDEN_RETRY
        # Asked at every use: a volume removed behind our back must not be
        # mounted by name, which would make an empty one in its place.
        labels = image.get("Config", {}).get("Labels") or {}
        name = labels.get(LABEL_LOWER)
        volume = self.engine.volume(name) if name else None
        if name and not _is_golden(volume) and time.monotonic() >= self._golden_refill.get(key, 0.0):
            # Its files are the image's, so a volume made again from it is the
            # same: tried again now and then (an overlay may have failed for a
            # passing reason), not given up on for the image's life.
            self._golden_refill[key] = time.monotonic() + _GOLDEN_RETRY
            with self._golden_lock:
                self._refill_golden_volume(spec, base, key, image["Id"], name, labels)
            volume = self.engine.volume(name)
        if _is_golden(volume) and self.engine.container(f"{GOLDEN_REPOSITORY}-{key}") is not None:
            # Being made again by another process (its builder is the lock):
            # labelled, but perhaps not filled yet. Not to stand on now.
            volume = None
        return _Golden(tag, volume if _is_golden(volume) else None)

    def _refill_golden_volume(
        self, spec: ServerSpec, base: dict, key: str, image: str, name: str, labels: dict[str, str]
    ) -> None:
        """The golden volume ``name`` of ``image`` made again, one process at a
        time (the builder's name is the lock), unless another just did."""
        lock = builder(self.engine, spec, base, f"{GOLDEN_REPOSITORY}-{key}")
        if lock is None:
            return
        try:
            if not _is_golden(self.engine.volume(name)):
                self._fill_golden_volume(image, name, f"{GOLDEN_REPOSITORY}-{key}-probe", golden_labels(labels))
                if _is_golden(self.engine.volume(name)):
                    log.info("golden volume %s of %s made again", name, spec.image)
        finally:
            self.engine.remove_container(lock)

    def _fill_golden_volume(self, image: str, name: str, probe: str, labels: dict[str, str]) -> None:
        """The golden volume ``name``, filled from ``image``, if an overlay on it
        works on this engine as a server uses it; else none, and servers get copies."""

        def clear_probe() -> None:
            self.engine.remove_container(probe)
            for volume in (volume_name(probe), *_layers(probe)):
                self.engine.remove_volume(volume)

        # Whatever a crashed build of this key left.
        clear_probe()
        try:
            lower = self._api.create_volume(name=name, labels=labels)
            self._make_overlay(probe, labels, name, lower["Mountpoint"])
            # Created, the engine fills the empty golden volume from the image;
            # started, it mounts an overlay on it, where the server's own user
            # reads the golden files and writes its own.
            self._api.create_container(
                image,
                name=probe,
                user="postgres",
                entrypoint=["sh", "-c"],
                command=["test -s /probe/data/PG_VERSION && touch /probe/data/probe && rm /probe/data/probe "
                         f"&& rm /probe/data/{GOLDEN_MARK} && test ! -e /probe/data/{GOLDEN_MARK}"],
                labels=labels,
                host_config=self._api.create_host_config(
                    network_mode="none",
                    binds=[f"{name}:{GOLDEN_HOME}:rw", f"{volume_name(probe)}:/probe:rw,nocopy"],
                ),
                volumes=[GOLDEN_HOME, "/probe"],
            )
            self._api.start(probe)
            exit_code = self._api.wait(probe, timeout=60)["StatusCode"]
            if exit_code != 0:
                raise GoldenFailed(f"the golden data did not work through an overlay (exit code {exit_code})")
        except (docker.errors.APIError, requests.exceptions.RequestException, GoldenFailed) as exc:
            log.warning("servers get copies of the golden data: an overlay on it does not work here: %s", exc)
            failed = True
        else:
            failed = False
        finally:
            clear_probe()
        if failed:
            # After the probe, which mounts it.
            self.engine.remove_volume(name)

    def _prune_golden(self, image: str, base_id: str) -> None:
        """Drop the golden images of earlier versions of ``image`` (it has
        changed) or of an earlier way of making them, once no server uses them;
        and golden volumes that no golden image names and no server stands on."""
        named = prune_golden_images(self.engine, image, base_id)
        for volume in self._api.volumes(filters={"label": f"{LABEL_GOLDEN_OF}={image}"}).get("Volumes") or []:
            if volume["Name"] in named:
                continue
            # A server mounts the golden volume it stands on, but data kept
            # without its server (a failed database) does not: look for it.
            if not self._stood_on(volume["Name"]):
                try:
                    self.engine.remove_volume(volume["Name"])
                except docker.errors.APIError:
                    pass  # in use after all: tried again next time

    def _stood_on(self, golden_volume: str) -> bool:
        """Whether some data volume is an overlay on ``golden_volume``."""
        return bool(self._api.volumes(filters={"label": f"{LABEL_LOWER}={golden_volume}"}).get("Volumes"))


def _is_golden(volume: dict | None) -> bool:
    """Whether ``volume`` is a golden volume, not an empty one of its name."""
    return volume is not None and LABEL_GOLDEN_BASE in (volume.get("Labels") or {})


def _layers(database_id: str) -> tuple[str, str]:
    """The volumes an overlay data volume is made of: its changes, and the
    overlay's own working directory."""
    return f"dbprov-{database_id}-upper", f"dbprov-{database_id}-work"
