"""Host ports: each live database holds one of DBPROV_PORT_RANGE."""

from __future__ import annotations

import random

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import PortRangeExhausted
from .models import Database


def pick_port(session: Session, port_range: tuple[int, int]) -> int:
    """A host port in ``port_range`` that no live database holds.

    The unique constraint on ``host_port`` settles races: of two creates that
    pick the same port, one commits and the other picks again.
    """
    first, last = port_range
    used = set(session.scalars(select(Database.host_port).where(Database.host_port.is_not(None))))
    free = [port for port in range(first, last + 1) if port not in used]
    if not free:
        raise PortRangeExhausted(
            f"all {last - first + 1} ports of {first}-{last} are held by live databases; "
            "delete one or widen DBPROV_PORT_RANGE"
        )
    # Random rather than lowest-first, so concurrent creates seldom collide.
    return random.choice(free)
