"""What a create asks for, as one object from the server's request schema to
this client.

The server loads a ``POST /databases`` body into a ``CreateRequest`` and
checks that; this client sends ``CreateRequest.body()``. A field added here is
a field of both, and of ``Client.create``'s keywords.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class _ServerDefault:
    """A field left out of the request: the server's default applies (where
    None is a value of its own, such as an idle_stop of never)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _ServerDefault()


@dataclass(frozen=True)
class CreateRequest:
    """Every field is optional; left out, the server decides (its default
    version, plan and expiry)."""

    name: str | None = None
    version: str | None = None
    superuser: bool = False
    #: False: its server does not sync writes to disk (fsync off), for data a
    #: test suite can lose: a crash of the machine may lose or corrupt it.
    durable: bool = True
    #: Seconds it lives, or ``expires_at``: not both.
    ttl: float | None = None
    expires_at: datetime | None = None
    protected: bool = False
    #: Seconds without clients after which it sleeps (and wakes on the next
    #: connection); None: never; left out: the plan's or the service's default.
    idle_stop: float | None = DEFAULT
    plan: str | None = None
    parameters: Mapping[str, str] | None = None
    extensions: Sequence[str] | None = None
    #: Where its data comes from, one at most: a snapshot's id, a database's
    #: id (a snapshot of it is taken first) or a ready template's key.
    from_snapshot: str | None = None
    from_database: str | None = None
    template: str | None = None

    @property
    def sources(self) -> list[str]:
        """The names of the sources asked for, in field order."""
        return [name for name in ("from_snapshot", "from_database", "template") if getattr(self, name) is not None]

    def body(self) -> dict[str, Any]:
        """The JSON body: what differs from the defaults."""
        body: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value == field.default:
                continue
            if isinstance(value, datetime):
                value = iso(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif field.name == "extensions":
                value = list(value)
            body[field.name] = value
        return body


def iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("give the time with its offset (an aware datetime)")
    return moment.isoformat()
