"""The storage seam: how a server's data is made, copied, frozen and removed on an engine.

The Docker runtime runs servers; a ``StorageBackend`` decides what their data
is made of: a volume of its own files (initdb's, or a copy), or one that
shares an initialised base's files and holds only its own changes (``overlay``:
an overlay mount on a golden volume, and copies file by file), or one whose
copies share blocks until written (``btrfs``: subvolumes of a pool, whose
snapshots are made in constant time, of a running server).

Every method lets the engine's errors through: the runtime translates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..runtime.protocol import ServerSpec, StorageReport


@dataclass(frozen=True)
class ServerData:
    """A server's data as its container is made on it."""

    database_id: str
    # The image the server runs: one whose files hold an initialised data
    # directory (a golden image), or the spec's own.
    image: str
    # What the container mounts, as docker-py's ``volumes=``.
    volumes: dict
    # The data directory inside the container.
    pgdata: str
    # Whether the data begins initialised rather than by the image's own
    # initdb: then its first start sets the superuser's password.
    initialised: bool
    # The base it shares files with, which must outlive it; None for data of its own.
    base: str | None = None
    # Whether it was made for this server now, so holds nothing of the tenant's yet.
    made: bool = False


class StorageBackend(Protocol):
    """What the Docker runtime asks of the data under its servers."""

    def prepare(self, spec: ServerSpec, image: dict) -> ServerData:
        """The server's data, made if it has none: from nothing (for initdb) or
        from the initialised base of ``spec``'s image (``image``, as the engine
        describes it) and superuser. Data it has already is used as it is."""

    def confirm(self, data: ServerData, container_id: str) -> None:
        """Once the server's container is made on ``data``: ``TransientError``,
        with the container and whatever was made for it removed, if the base
        went meanwhile (mounting a volume by name makes an empty one in its place)."""

    def has_data(self, database_id: str) -> bool: ...

    def with_data(self) -> set[str]:
        """The ids of this installation's data, with or without a server."""

    def copy(self, source_id: str, target_id: str, image: str) -> int:
        """``target_id``'s data made from ``source_id``'s, with a job from
        ``image``; its size in bytes. Both a snapshot frozen from a server's data
        and a server's data made from a snapshot (or a clone's from its
        source's) are this: a snapshot's data is stored like a server's."""

    def copies_live(self, database_id: str) -> bool:
        """Whether ``copy`` of ``database_id``'s data is of one instant while its
        server runs (crash-consistent), so a snapshot needs no stop."""

    def report(self) -> StorageReport: ...

    def remove(self, database_id: str) -> None:
        """Its data, and whatever it is made of that is its alone; gone already is fine."""

    def prune_caches(self) -> list[str]:
        """Remove the bases no data stands on now, for every installation on the
        engine (they share them); returns what went."""
