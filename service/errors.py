"""The project's exceptions: one root, and under it what the caller did wrong,
what retrying later can mend (transient) and what it cannot (permanent).

They say what happened and what to do next, never which HTTP status to send:
the API layer keeps that in one table (``api.problems``).
"""

from __future__ import annotations

from typing import Any


class DbprovError(Exception):
    """Root of every error the service raises on purpose."""

    # Seconds after which trying again may succeed; None: it will not by itself.
    retry_after: int | None = None

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        # Facts for the caller beside the text (ids, limits), shown in problem documents.
        self.extensions = extensions


# -- the request ----------------------------------------------------------------


class SettingsError(DbprovError):
    """A ``DBPROV_*`` variable has a value the service cannot use."""

    def __init__(self, variable: str, detail: str) -> None:
        super().__init__(f"{variable}: {detail}")
        self.variable = variable


class ValidationError(DbprovError):
    """The request is well-formed but asks for something the service does not offer."""


class Unauthorized(DbprovError):
    """No token, or one that is unknown or revoked."""

    def __init__(self, detail: str, error: str | None = "invalid_token") -> None:
        super().__init__(detail)
        # RFC 6750's error code; None when the request carried no token at all.
        self.error = error


class Forbidden(DbprovError):
    """The caller may not do this."""


class QuotaExceeded(Forbidden):
    """The tenant is at its limit of live databases."""


class NotLocal(Forbidden):
    """With authentication off, a request that does not come from this machine
    by one of its loopback names: from another machine, or from a web page whose
    own host name was made to lead here (DNS rebinding)."""


class RateLimited(DbprovError):
    """The token used up its write requests for this minute."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)


class NotFound(DbprovError):
    """No such thing, or one the caller may not see."""


class Conflict(DbprovError):
    """The thing is not in a state that allows this."""


class Busy(Conflict):
    """The thing is in the middle of something of its own that ends shortly
    (a snapshot's short stop); the same request will work then."""

    retry_after = 5


# -- transient: retrying later can help ------------------------------------------


class TransientError(DbprovError):
    """Something needed is unreachable or busy; the same step may work later."""

    retry_after = 5


class RuntimeUnavailable(TransientError):
    """The container engine cannot be reached, or did not answer in time."""

    retry_after = 10


class NodeUnavailable(RuntimeUnavailable):
    """The machine holding a server's data is down or gone (a Swarm node); the
    data is presumably intact there, and nothing can be done with it until
    that machine is back."""


class MetadataUnavailable(TransientError):
    """The metadata store cannot be reached, or is not migrated yet."""


class PortRangeExhausted(TransientError):
    """Every host port of the range is held by a live database."""

    retry_after = 30


class PortInUse(TransientError):
    """Something outside dbprov already listens on the host port."""


class EngineError(TransientError):
    """The engine failed an operation on its side (a 5xx), not because of what was asked."""


class InsufficientStorage(TransientError):
    """The service's own disk has no room for this now (a restore's upload)."""

    retry_after = 60


class Locked(TransientError):
    """Someone else is building it right now (a template); ask again shortly."""


class ImagePulling(TransientError):
    """A version's image is being pulled right now."""

    retry_after = 15


# -- permanent: retrying the same thing cannot help -------------------------------


class PermanentError(DbprovError):
    """The step cannot succeed as asked; the database fails on the first attempt."""


class ImageMissing(PermanentError):
    """A version's image is not on the engine and cannot be pulled.

    An operator mends it with ``dbprov images pull``, or by loading the image.
    """

    def __init__(self, detail: str, image: str, version: str | None = None) -> None:
        super().__init__(detail, image=image, **({"version": version} if version else {}))
        self.image = image


class EngineRefused(PermanentError):
    """The engine refused the server's configuration (a 4xx)."""


class ServerFailed(PermanentError):
    """A database server crashed or never became ready; the text carries its log."""


class DataLost(PermanentError):
    """A database's data is gone from the engine: a server made now would be
    an empty one, never the tenant's."""


class JobTimedOut(PermanentError):
    """A job beside a server ran past its time and was stopped; a restore's
    transaction is rolled back with it. The same job would only time out again."""


class NotSupported(PermanentError):
    """The runtime cannot do this at all (say, Swarm and a job on another node's
    data); the text says what cannot be done and why."""


# -- a database server's own answers ---------------------------------------------


class ProvisioningFailed(DbprovError):
    """A create's database failed instead of becoming ready."""


class DatabaseServerError(DbprovError):
    """A tenant's PostgreSQL server refused or could not be reached."""


class IllegalMove(DbprovError):
    """A bug, not a request's fault: a status change that the table of allowed
    moves (``domain.models``) does not have. Nothing was written."""
