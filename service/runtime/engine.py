"""The Docker engine as both runtimes use it: docker-py's errors made the project's, and
the images, containers, volumes and one-off jobs they share.

docker-py's errors become the project's in one place, ``translated``; every
other method here lets them through, for the caller to translate (and, where
it has a use for one, to tell one from another first).
"""

from __future__ import annotations

import re
import secrets
import tarfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import docker
import docker.errors
import requests.exceptions
from docker.utils import parse_repository_tag

from ..errors import (
    EngineError,
    EngineRefused,
    ImageMissing,
    JobTimedOut,
    PortInUse,
    RuntimeUnavailable,
)
from .protocol import JobResult, container_name

# Marks the one-off containers of jobs and copies, which are not servers.
LABEL_JOB = "io.dbprov.job"
# Docker reports a taken host port only in the text of a 500 error; these are
# the phrasings of the engine's port allocator and of the kernel's bind().
PORT_TAKEN = ("port is already allocated", "address already in use")


@contextmanager
def translated() -> Iterator[None]:
    """docker-py and transport errors as the project's own, classified."""
    try:
        yield
    except docker.errors.APIError as exc:
        text = str(exc.explanation or exc)
        if any(phrase in text.lower() for phrase in PORT_TAKEN):
            raise PortInUse(text) from exc
        status = exc.status_code or 500
        # 409 is a state the engine is passing through (a removal in progress,
        # a volume still in use): worth another try, unlike other refusals.
        if 400 <= status < 500 and status != 409:
            raise EngineRefused(f"Docker engine refused: {text}") from exc
        raise EngineError(f"Docker engine error: {text}") from exc
    except (
        docker.errors.DockerException,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
    ) as exc:
        raise RuntimeUnavailable(f"Docker engine unreachable: {exc}") from exc


class Engine:
    """One Docker engine, named by the usual ``DOCKER_*`` variables unless given a client."""

    def __init__(self, pull: bool = True, client: "docker.DockerClient | None" = None) -> None:
        # Whether a missing image is pulled rather than reported.
        self.pull = pull
        self._client = client

    @property
    def client(self) -> "docker.DockerClient":
        # Connect lazily: the service must start (and say so on /readyz) even
        # while the engine is down.
        if self._client is None:
            with translated():
                self._client = docker.from_env(timeout=30)
        return self._client

    # -- images -------------------------------------------------------------------

    def image(self, name: str) -> dict | None:
        try:
            return self.client.api.inspect_image(name)
        except docker.errors.ImageNotFound:
            return None

    def has_image(self, image: str) -> bool:
        with translated():
            return self.image(image) is not None

    def pull_image(self, image: str, progress: Callable[[str], None] | None = None) -> None:
        repository, tag = parse_repository_tag(image)
        try:
            with translated():
                for event in self.client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                    if "error" in event:
                        raise ImageMissing(f"cannot pull {image}: {event['error']}", image=image)
                    if progress is not None:
                        progress(" ".join(str(event[k]) for k in ("id", "status", "progress") if event.get(k)))
        except (EngineError, EngineRefused) as exc:
            # The registry is unreachable or does not know the image.
            raise ImageMissing(f"cannot pull {image}: {exc.detail}", image=image) from None

    # -- containers and volumes -------------------------------------------------------

    def container(self, name_or_id: str) -> dict | None:
        try:
            return self.client.api.inspect_container(name_or_id)
        except docker.errors.NotFound:
            return None

    def remove_container(self, name_or_id: str) -> None:
        try:
            # v=True: anonymous volumes an image declares go with it.
            self.client.api.remove_container(name_or_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # 409: removal already in progress, which is what we want.
            if exc.status_code != 409:
                raise

    def tail(self, container: str) -> str:
        """The last lines of a container's log."""
        return self.client.api.logs(container, tail=10).decode("utf-8", errors="replace").strip()

    def volume(self, name: str) -> dict | None:
        try:
            return self.client.api.inspect_volume(name)
        except docker.errors.NotFound:
            return None

    def remove_volume(self, name: str) -> None:
        try:
            self.client.api.remove_volume(name)
        except docker.errors.NotFound:
            pass

    # -- jobs -------------------------------------------------------------------------

    def job_container(
        self,
        database_id: str,
        labels: dict[str, str],
        image: str,
        command: list[str],
        volumes: dict,
        network_mode: str,
        environment: dict[str, str] | None = None,
    ):
        """A created (not started) one-off container that runs ``command`` for ``database_id``."""
        return self.client.containers.create(
            image,
            entrypoint=command[:1],
            command=command[1:],
            name=f"{container_name(database_id)}-job-{secrets.token_hex(3)}",
            labels={**labels, LABEL_JOB: "true"},
            volumes=volumes,
            network_mode=network_mode,
            environment=environment or {},
            security_opt=["no-new-privileges:true"],
        )

    def run(self, container, command: list[str], input_file: Path | None, timeout: float) -> JobResult:
        """Run a created job container to its end; removed at the end. ``input_file``
        is there as /tmp/input."""
        try:
            if input_file is not None:
                container.put_archive("/tmp", _tar_of(input_file, "input"))
            container.start()
            try:
                status = container.wait(timeout=timeout)
            except requests.exceptions.ReadTimeout:
                raise JobTimedOut(f"{command[0]} ran longer than {timeout:g} s and was stopped") from None
            output = container.logs().decode("utf-8", errors="replace")
            return JobResult(exit_code=status.get("StatusCode", -1), output=output)
        finally:
            self.remove_container(container.id)

    def stream(self, container, command: list[str]) -> Iterator[bytes]:
        """Start a created job container and yield its standard output; removed at the end."""
        output = None
        try:
            with translated():
                # Attached before it starts, for every byte as written: the
                # engine's logs are kept as text and would mangle a binary stream.
                output = self.client.api.attach(container.id, stdout=True, stderr=False, stream=True, logs=True)
                container.start()
                for chunk in output:
                    yield chunk
                status = container.wait()
                if status.get("StatusCode", -1) != 0:
                    error = container.logs(stdout=False, stderr=True).decode("utf-8", errors="replace")
                    raise EngineError(f"{command[0]} failed: {error.strip()}")
        finally:
            if output is not None:
                # Both: closing the stream shuts its socket down, and the
                # response still holds the file object that owns it.
                output.close()
                output._response.close()
            with translated():
                self.remove_container(container.id)


def when(text: str | None) -> datetime:
    """The engine's RFC 3339 times, with their nanoseconds cut to what datetime holds."""
    if not text:
        return datetime.min.replace(tzinfo=timezone.utc)
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        return datetime.min.replace(tzinfo=timezone.utc)
    fraction = (match[2] or "0")[:6].ljust(6, "0")
    zone = "+00:00" if match[3] == "Z" else match[3]
    return datetime.fromisoformat(f"{match[1]}.{fraction}{zone}")


def _tar_of(path: Path, name: str) -> Iterator[bytes]:
    """``path`` as a one-file tar archive named ``name``, for put_archive, made
    as it is sent: an upload (up to DBPROV_RESTORE_MAX_BYTES) is never copied
    a second time on disk."""
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    # Readable by whatever user the job runs as.
    info.mode = 0o644
    info.mtime = int(time.time())
    yield info.tobuf()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            yield chunk
    # The file's last block filled up, then the two empty blocks that end an archive.
    yield tarfile.NUL * (-info.size % tarfile.BLOCKSIZE) + tarfile.NUL * (2 * tarfile.BLOCKSIZE)
