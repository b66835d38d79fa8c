"""dbprov's client: the `dbprov` command, a Python client and a pytest plugin.

    from dbprov_client import Client

    with Client().database(version="17", ttl=600) as db:
        print(db.connection_uri)
"""

from .client import Client
from .clones import Clone, Clones
from .create_request import CreateRequest
from .durations import parse_duration
from .errors import Locked, NotFound, ProblemError, Refused, Unavailable, WaitTimeout
from .models import Credentials, Database, DatabasePage, Event, Health, Plan, Quota, Snapshot, Template

__all__ = [
    "Client",
    "Clone",
    "Clones",
    "CreateRequest",
    "Credentials",
    "Database",
    "DatabasePage",
    "Event",
    "Health",
    "Locked",
    "NotFound",
    "Plan",
    "ProblemError",
    "Quota",
    "Refused",
    "Snapshot",
    "Template",
    "Unavailable",
    "WaitTimeout",
    "parse_duration",
]
