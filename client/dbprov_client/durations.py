"""Durations as people write them (``90``, ``90s``, ``30m``, ``2h``, ``1d``, ``1h30m``) and show them."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(value: str | int | float | timedelta) -> int:
    """Whole seconds, at least 1. Raises ValueError for anything else."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = value
    else:
        text = value.strip().lower()
        if re.fullmatch(r"\d+", text):
            seconds = int(text)
        elif text and re.fullmatch(rf"(?:{_PART.pattern})+", text):
            seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(text))
        else:
            raise ValueError(f"not a duration: {value!r} (e.g. 600, 90s, 30m, 2h, 1d, 1h30m)")
    seconds = int(round(seconds))
    if seconds < 1:
        raise ValueError(f"a duration must be at least 1 second, not {value!r}")
    return seconds


def human(seconds: float) -> str:
    """A short rendering: 42s, 3m, 2h5m, 4d."""
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{seconds // 86400}d"
