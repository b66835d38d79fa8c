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


class ContainerRuntimeError(DbprovError):
    """Docker refused an operation for a reason other than being unreachable."""

    slug = "docker-error"
    title = "Docker engine error"


class PortInUse(ContainerRuntimeError):
    """Something outside dbprov already listens on the host port."""

    slug = "port-in-use"
    title = "Host port in use"
