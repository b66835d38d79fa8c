"""The database-level settings a create may set, and the values PostgreSQL takes
for them: checked when the request arrives, so that a value the server would
refuse is a 422 naming it rather than a database that fails to provision.

The table is PostgreSQL's own ``pg_settings`` (type, unit, range, enum values)
for each major version the service knows; tests/integration/test_parameters.py
holds it, and the verdicts below, to the servers' own. A version it does not know is
checked against the nearest one below it (these settings change rarely: only
maintenance_work_mem's minimum moved between 15 and 17), else the oldest.
How values parse follows PostgreSQL's guc.c: units are case-sensitive,
integers may be fractional and are rounded, booleans take unique prefixes.
"""

from __future__ import annotations

import math
import re
import zoneinfo
from dataclasses import dataclass

from ..errors import ValidationError

_INT_MAX = 2147483647


@dataclass(frozen=True)
class Parameter:
    vartype: str  # bool, enum, integer, real, string
    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    values: tuple[str, ...] = ()
    # Accepted beside ``values`` but not listed in pg_settings.enumvals.
    hidden: tuple[str, ...] = ()


_BOOL = Parameter("bool")
_MS = Parameter("integer", "ms", 0, _INT_MAX)
_COST = Parameter("real", None, 0, 1.79769e308)

# pg_settings of PostgreSQL 15, for the settings DATABASE_PARAMETERS allows.
_V15: dict[str, Parameter] = {
    "default_statistics_target": Parameter("integer", None, 1, 10000),
    "default_transaction_isolation": Parameter(
        "enum", values=("serializable", "repeatable read", "read committed", "read uncommitted")
    ),
    "default_transaction_read_only": _BOOL,
    "effective_cache_size": Parameter("integer", "8kB", 1, _INT_MAX),
    "effective_io_concurrency": Parameter("integer", None, 0, 1000),
    "idle_in_transaction_session_timeout": _MS,
    "idle_session_timeout": _MS,
    "jit": _BOOL,
    "lock_timeout": _MS,
    "log_min_duration_statement": Parameter("integer", "ms", -1, _INT_MAX),
    "maintenance_work_mem": Parameter("integer", "kB", 1024, _INT_MAX),
    "random_page_cost": _COST,
    "search_path": Parameter("string"),
    "seq_page_cost": _COST,
    "statement_timeout": _MS,
    "synchronous_commit": Parameter(
        "enum", values=("local", "remote_write", "remote_apply", "on", "off"),
        hidden=("true", "false", "yes", "no", "1", "0"),
    ),
    "temp_buffers": Parameter("integer", "8kB", 100, 1073741823),
    "work_mem": Parameter("integer", "kB", 64, _INT_MAX),
    "datestyle": Parameter("string"),
    "intervalstyle": Parameter("enum", values=("postgres", "postgres_verbose", "sql_standard", "iso_8601")),
    "timezone": Parameter("string"),
}
KNOWN: dict[int, dict[str, Parameter]] = {
    15: _V15,
    17: {**_V15, "maintenance_work_mem": Parameter("integer", "kB", 64, _INT_MAX)},
}

# guc.c's unit tables: what each unit is in bytes, or in milliseconds.
_MEMORY = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_BASE = {"kB": ("memory", 1024), "8kB": ("memory", 8192), "ms": ("time", 1), "s": ("time", 1000), "min": ("time", 60_000)}
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?0[xX][0-9a-fA-F]+)\s*([A-Za-z]*)\s*")
_DATESTYLES = {
    "iso", "sql", "postgres", "german", "ymd", "dmy", "euro", "european", "mdy", "us", "noneuro",
    "noneuropean", "default",
}
_ORDERS = {"ymd", "dmy", "euro", "european", "mdy", "us", "noneuro", "noneuropean"}
# POSIX time zone specifications (EST5EDT, <+03>-3, UTC+2:30), and plain hours.
_POSIX_ZONE = re.compile(r"(?:[A-Za-z]{3,}|<[A-Za-z0-9+-]+>)[+-]?\d{1,2}(?::\d{2}){0,2}(?:[A-Za-z]{3,}.*)?")
_HOURS = re.compile(r"[+-]?\d+(?:\.\d+)?")


def parameters_of(version: str) -> dict[str, Parameter]:
    """The table for a major version: its own, the nearest below it, or the oldest."""
    major = int(version) if version.isdigit() else 0
    below = [known for known in KNOWN if known <= major]
    return KNOWN[max(below) if below else min(KNOWN)]


def check_values(version: str, parameters: dict[str, str]) -> None:
    """Raise ``ValidationError`` naming the first setting whose value the server would refuse."""
    table = parameters_of(version)
    for name, value in parameters.items():
        parameter = table.get(name)
        if parameter is None:
            continue  # which names are allowed at all is the caller's check
        problem = _problem(name, parameter, value)
        if problem:
            raise ValidationError(
                f"parameters: {name} = {value!r}: {problem}",
                errors={"json": {"parameters": {name: [f"{problem}."]}}},
            )


def _problem(name: str, parameter: Parameter, value: str) -> str | None:
    if parameter.vartype == "bool":
        return None if _is_bool(value) else "not a boolean (on, off, true, false, yes, no, 1, 0)"
    if parameter.vartype == "enum":
        accepted = parameter.values + parameter.hidden
        return None if value.strip().lower() in accepted else f"must be one of: {', '.join(parameter.values)}"
    if parameter.vartype in ("integer", "real"):
        return _number_problem(parameter, value)
    return _STRING_CHECKS[name](value)


def _is_bool(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "0", "on", "off", "of"):
        return True
    return bool(text) and any(word.startswith(text) for word in ("true", "false", "yes", "no"))


def _number_problem(parameter: Parameter, value: str) -> str | None:
    match = _NUMBER.fullmatch(value)
    if not match:
        return "not a number" + (f" (with an optional unit; the default unit is {parameter.unit})" if parameter.unit else "")
    number_text, unit = match.groups()
    # strtol's base 0, as guc.c parses: hexadecimal too.
    number = float(int(number_text, 16)) if "x" in number_text.lower() else float(number_text)
    if unit:
        kind_and_base = _BASE.get(parameter.unit or "")
        if kind_and_base is None:
            return f"takes no unit, not {unit!r}"
        kind, base = kind_and_base
        units = _MEMORY if kind == "memory" else _TIME
        if unit not in units:
            return f"unknown unit {unit!r}; units are {', '.join(units)} (case matters)"
        number = number * units[unit] / base
    if parameter.vartype == "integer":
        if not math.isfinite(number):
            return "out of range"
        number = float(round(number))
    if not (parameter.minimum <= number <= parameter.maximum):
        shown = f"{_shown(parameter.minimum)} to {_shown(parameter.maximum)}"
        return f"out of range: {shown}" + (f" (in {parameter.unit})" if parameter.unit else "")
    return None


def _shown(number: float) -> str:
    return str(int(number)) if number == int(number) and abs(number) < 1e15 else f"{number:g}"


def _datestyle(value: str) -> str | None:
    tokens = [token.strip().lower() for token in value.split(",")]
    if not tokens or any(token not in _DATESTYLES for token in tokens):
        return "not a DateStyle (an output style such as ISO, and an order such as MDY)"
    if len([t for t in tokens if t not in _ORDERS and t != "default"]) > 1 or len(
        [t for t in tokens if t in _ORDERS]
    ) > 1:
        return "conflicting styles"
    return None


def _timezone(value: str) -> str | None:
    text = value.strip()
    if _HOURS.fullmatch(text) or _POSIX_ZONE.fullmatch(text) or text.lower() in _ZONES:
        return None
    return "not a time zone this server knows (an IANA name such as Europe/Berlin, or an offset)"


# search_path takes any text: given as one literal, it is one (quoted) schema name.
_STRING_CHECKS = {"search_path": lambda value: None, "datestyle": _datestyle, "timezone": _timezone}
# PostgreSQL matches zone names without regard to case.
_ZONES = {zone.lower() for zone in zoneinfo.available_timezones()} | {"utc", "gmt", "z", "zulu", "localtime"}
