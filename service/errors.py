"""The project's exceptions: one root, each subclass knowing its HTTP status and problem type."""

from __future__ import annotations

from typing import Any


class DbprovError(Exception):
    """Root of every error the service raises on purpose.

    ``status`` and ``slug`` let the HTTP layer render any of them as an RFC 9457
    problem; the domain layer never builds HTTP responses itself.
    """

    status = 500
    slug = "internal-error"
    title = "Internal error"
    retry_after: int | None = None

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}


class SettingsError(DbprovError):
    """A ``DBPROV_*`` variable has a value the service cannot use."""

    slug = "invalid-settings"
    title = "Invalid settings"

    def __init__(self, variable: str, detail: str) -> None:
        super().__init__(f"{variable}: {detail}")
        self.variable = variable


class ValidationError(DbprovError):
    """The request is well-formed but asks for something the service does not offer."""

    status = 422
    slug = "validation-error"
    title = "Request validation failed"


class Unauthorized(DbprovError):
    """No token, or one that is unknown or revoked."""

    status = 401
    slug = "unauthorized"
    title = "Authentication required"

    def __init__(self, detail: str, error: str | None = "invalid_token") -> None:
        super().__init__(detail)
        self.error = error

    def headers(self) -> dict[str, str]:
        # RFC 6750: no error code when the request carried no token at all.
        challenge = 'Bearer realm="dbprov"'
        if self.error:
            challenge += f', error="{self.error}"'
        return {"WWW-Authenticate": challenge}


class Forbidden(DbprovError):
    status = 403
    slug = "forbidden"
    title = "Forbidden"


class QuotaExceeded(DbprovError):
    status = 403
    slug = "quota-exceeded"
    title = "Database quota exceeded"


class RateLimited(DbprovError):
    status = 429
    slug = "rate-limited"
    title = "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)


class NotFound(DbprovError):
    status = 404
    slug = "not-found"
    title = "Not found"


class Conflict(DbprovError):
    status = 409
    slug = "conflict"
    title = "Conflict"


class PortRangeExhausted(DbprovError):
    status = 503
    slug = "port-range-exhausted"
    title = "No free host port"
    retry_after = 30


class RuntimeUnavailable(DbprovError):
    """The Docker engine cannot be reached."""

    status = 503
    slug = "docker-unavailable"
    title = "Docker engine unavailable"
    retry_after = 10


class MetadataUnavailable(DbprovError):
    """The metadata store cannot be reached."""

    status = 503
    slug = "metadata-unavailable"
    title = "Metadata store unavailable"
    retry_after = 5


class ProvisioningFailed(DbprovError):
    """The container was created but never became ready."""

    status = 502
    slug = "provisioning-failed"
    title = "Provisioning failed"


class DatabaseServerError(DbprovError):
    """A tenant's PostgreSQL server refused or could not be reached."""

    status = 502
    slug = "database-server-error"
    title = "Database server error"


class ContainerRuntimeError(DbprovError):
    """Docker refused an operation for a reason other than being unreachable."""

    slug = "docker-error"
    title = "Docker engine error"


class PortInUse(ContainerRuntimeError):
    """Something outside dbprov already listens on the host port."""

    slug = "port-in-use"
    title = "Host port in use"
