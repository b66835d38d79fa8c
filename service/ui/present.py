"""How the page words times, statuses and choices."""

from __future__ import annotations

from datetime import datetime

from ..domain.models import COMING_UP, Status, utcnow
from ..settings import Settings

# On the way from one state to another: the page polls quickly while any is shown.
BUSY = frozenset({*COMING_UP, Status.STOPPING, Status.DELETING})

# Expiries offered by the create form, in seconds.
TTL_CHOICES = (
    (15 * 60, "15 minutes"),
    (60 * 60, "1 hour"),
    (8 * 60 * 60, "8 hours"),
    (24 * 60 * 60, "1 day"),
    (7 * 24 * 60 * 60, "7 days"),
    (30 * 24 * 60 * 60, "30 days"),
)


def span(seconds: float) -> str:
    """A duration in its largest sensible unit: 42 s, 5 min, 3 h, 2 d."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        hours, rest = divmod(seconds, 3600)
        return f"{hours} h {rest // 60} min" if hours < 10 and rest >= 60 else f"{hours} h"
    return f"{seconds // 86400} d"


def age(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return ""
    return span(((now or utcnow()) - when).total_seconds())


def expiry(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "never"
    left = (when - (now or utcnow())).total_seconds()
    return f"in {span(left)}" if left > 0 else "due now"


def stamp(when: datetime | None) -> str:
    """An exact time for a ``<time>`` element's title and datetime."""
    return when.isoformat(timespec="seconds") if when else ""


def ttl_choices(settings: Settings) -> list[tuple[str, str]]:
    """The create form's expiry options: the service's default first, then the presets
    the longest allowed expiry (DBPROV_MAX_TTL) permits."""
    default = settings.default_ttl or settings.max_ttl
    choices = [("", f"Service default ({span(default)})" if default else "Never")]
    for seconds, label in TTL_CHOICES:
        if settings.max_ttl is None or seconds <= settings.max_ttl:
            choices.append((str(seconds), label))
    return choices


def plan_label(plan) -> str:
    cpus = f", {plan.cpus:g} CPU" if plan.cpus else ""
    return f"{plan.name} ({plan.memory}{cpus})"
