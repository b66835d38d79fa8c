"""What an operator looks at: the warm pool per version and the host ports in use.

Read-only figures from the metadata store, as ``/metrics`` counts them, but
itemised for a person (the web page's admin view).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import func, select

from ..settings import Settings
from ..store.engine import Store
from .models import SETTLING, Database, Status
from .tenancy import POOL_TENANT


@dataclass(frozen=True)
class PoolLine:
    """One version's warm servers: how many are wanted, ready and on the way."""

    version: str
    wanted: int
    ready: int
    warming: int
    # Members in any other state (failed, being deleted): not claimable.
    other: int


@dataclass(frozen=True)
class PortUse:
    port: int
    database_id: str
    tenant: str
    name: str | None
    status: Status


@dataclass(frozen=True)
class Ports:
    first: int
    last: int
    used: list[PortUse]

    @property
    def total(self) -> int:
        return self.last - self.first + 1


class Overview:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def pool(self) -> list[PoolLine]:
        """Every configured version, with its pool size (0 where it has none) and members."""
        with self.store.read() as session:
            counts = session.execute(
                select(Database.version, Database.status, func.count())
                .where(Database.tenant == POOL_TENANT, Database.status != Status.DELETED)
                .group_by(Database.version, Database.status)
            ).all()
        by_version: dict[str, dict[Status, int]] = defaultdict(dict)
        for version, status, count in counts:
            by_version[version][status] = count
        lines = []
        for version in dict.fromkeys([*self.settings.images, *sorted(by_version)]):
            members = by_version.get(version, {})
            ready = members.get(Status.READY, 0)
            warming = sum(members.get(status, 0) for status in SETTLING)
            lines.append(PoolLine(
                version=version,
                wanted=self.settings.pool_sizes.get(version, 0),
                ready=ready,
                warming=warming,
                other=sum(members.values()) - ready - warming,
            ))
        return lines

    def ports(self) -> Ports:
        """The port range and each port a database (a warm server included) holds, in order."""
        with self.store.read() as session:
            rows = session.execute(
                select(Database.host_port, Database.id, Database.tenant, Database.name, Database.status)
                .where(Database.host_port.is_not(None))
                .order_by(Database.host_port)
            ).all()
        first, last = self.settings.port_range
        return Ports(first, last, [PortUse(*row) for row in rows])
