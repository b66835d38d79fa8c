"""One Docker engine behind ``ServerRuntime``.

With ``swarm_runtime``, which builds on it, the only modules that import
``docker``; docker-py's errors become the project's here, in ``_translated``.

A server is a container named ``dbprov-<id>`` on a volume ``dbprov-<id>-data``,
published on the bind address, attached to the installation's network (no
traffic between its containers), and labelled ``io.dbprov.*`` so that this
installation finds, and sweeps, only its own.

A new server skips ``initdb``: its data starts from a data directory
initialised once per image and superuser, kept in a local "golden" image
(``dbprov-golden:<key>``, made by ``docker commit``) and in a volume filled
from it (``dbprov-golden-<key>-<build>``). A server's data volume is an
overlay over that golden volume: its own changes go to a volume of its own
(``-upper``), the golden files are shared and never copied, so making one
costs no file at all.
Where the engine cannot mount an overlay, the volume is a full copy instead,
which the engine makes when an empty volume is mounted over the image's
files. Before the server first listens, its superuser gets its own password
in single-user mode; nobody ever knew the golden one.

A server's TLS certificate and key come in its environment, and an entry of
its own writes them into its container's files at every start (``tls_entry``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import secrets
import tarfile
import threading
import time
import weakref
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import docker
import docker.errors
import requests.exceptions
from docker.utils import parse_repository_tag

from ..errors import (
    EngineError,
    EngineRefused,
    ImageMissing,
    JobTimedOut,
    NotFound,
    PortInUse,
    RuntimeUnavailable,
    ServerFailed,
    TransientError,
)
from ..store.crypto import scram_verifier
from .protocol import (
    ABSENT,
    CRASHED,
    LABEL_DATABASE_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    PGDATA,
    RUNNING,
    STOPPED,
    Endpoint,
    JobResult,
    ServerCertificate,
    ServerInfo,
    ServerSpec,
    container_name,
    labels_for,
    volume_name,
)

log = logging.getLogger(__name__)

class GoldenFailed(EngineError):
    """A golden image could not be made; its servers initialise the usual way."""


# Marks the one-off containers of run_job and copy_data, which are not servers.
LABEL_JOB = "io.dbprov.job"
# Docker reports a taken host port only in the text of a 500 error; these are
# the phrasings of the engine's port allocator and of the kernel's bind().
_PORT_TAKEN = ("port is already allocated", "address already in use")

# Golden images and volumes: the repository and volume prefix, and the labels
# that say what each was made from (the base image's name and id, and how).
GOLDEN_REPOSITORY = "dbprov-golden"
LABEL_GOLDEN_OF = "io.dbprov.golden-of"
LABEL_GOLDEN_BASE = "io.dbprov.golden-base"
LABEL_GOLDEN_FORMAT = "io.dbprov.golden-format"
# Where a golden image keeps its data directory: outside every volume the
# postgres images declare, since a commit leaves volumes out. Its parent is
# what a golden volume and an overlay hold, so that the data directory (owned
# by postgres, mode 0700) is a file of the golden copy, not the root of the
# overlay, whose owner and mode the engine decides.
GOLDEN_HOME = "/var/lib/dbprov-golden"
GOLDEN_PGDATA = f"{GOLDEN_HOME}/data"
# Where a server on an overlay mounts, read-only, the volumes the overlay is
# made of: the engine then refuses to remove or prune them while it exists.
_LAYERS_AT = "/var/lib/dbprov-layers"
# On an overlay data volume: the golden volume under it. On a golden image:
# its golden volume.
LABEL_LOWER = "io.dbprov.lower"
# In a golden copy until its first start has set the superuser's password.
GOLDEN_MARK = "dbprov-golden"
# Bumped when the way a golden image is made changes, so old ones are not used.
_GOLDEN_FORMAT = "3"
# Seconds a subscription to the engine's events is trusted before it is made anew.
_EVENTS_RESUBSCRIBE = 60.0
# Seconds after which a golden build still under way was left by a crash.
_GOLDEN_STALE = 180.0
# Seconds before a golden image that could not be made is tried again.
_GOLDEN_RETRY = 600.0
# What the official entrypoint prints once initdb and the init scripts are done.
_INIT_DONE = b"init process complete"
# The entry of a server on a golden copy, at every start. On the first,
# single-user mode (as the data's owner, listening nowhere) sets the
# superuser's password; a crash in between repeats the step. Data that is not
# there (an overlay on a golden volume that went) is never made anew by
# initdb: a server on it would pass an empty cluster off as the tenant's. A server killed
# while it wrote its lock file leaves it empty, and PostgreSQL will not start
# on that: only one server ever runs on this data, so it is stale. The image's
# own entrypoint then finds PG_VERSION and starts the server without initdb.
_FIRST_START = f"""set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "dbprov: no data directory under this server: its golden volume is gone or was empty" >&2
    exit 64
fi
if [ -e "$PGDATA/{GOLDEN_MARK}" ]; then
    printf '%s\\n' "$DBPROV_FIRST_START" | postgres --single -D "$PGDATA" postgres > /dev/null
    rm "$PGDATA/{GOLDEN_MARK}"
fi
unset DBPROV_FIRST_START
if [ -e "$PGDATA/postmaster.pid" ] && [ ! -s "$PGDATA/postmaster.pid" ]; then
    rm "$PGDATA/postmaster.pid"
fi
exec "$@"
"""
# Where a server's certificate and key are: in its container's own files,
# outside every volume, so that a snapshot or a clone never carries another
# server's key and a server made anew gets only its own. Under /tmp, which
# every image lets any user write to: the entry may run as root or as the
# image's postgres user (a golden copy's server), whose uid only the image knows.
TLS_DIR = "/tmp/dbprov-tls"
TLS_ARGS = (
    "-c", "ssl=on", "-c", f"ssl_cert_file={TLS_DIR}/server.crt", "-c", f"ssl_key_file={TLS_DIR}/server.key",
)
# The variables that carry them to the container (as POSTGRES_PASSWORD does
# the superuser's password): a Swarm service's container can be given no file
# before it starts, and a container made anew needs them again.
_TLS_CERTIFICATE, _TLS_KEY = "DBPROV_TLS_CERTIFICATE", "DBPROV_TLS_KEY"
# The entry of a server with TLS, at every start: the certificate and key
# into files its user owns, mode 0600 as PostgreSQL demands of a key,
# whichever user it starts as (root hands them over by name), then the entry
# that comes next, without them in its environment.
_TLS_START = f"""set -e
umask 077
mkdir -p {TLS_DIR}
printf '%s' "${_TLS_CERTIFICATE}" > {TLS_DIR}/server.crt
printf '%s' "${_TLS_KEY}" > {TLS_DIR}/server.key
if [ "$(id -u)" = 0 ]; then
    chown -R postgres {TLS_DIR}
fi
unset {_TLS_CERTIFICATE} {_TLS_KEY}
exec "$@"
"""


def tls_entry(
    certificate: ServerCertificate, entrypoint: list[str], command: list[str], environment: dict[str, str]
) -> tuple[list[str], list[str], dict[str, str]]:
    """A server's entrypoint, command and environment with TLS: its own entry
    behind one that writes the certificate and key the environment carries."""
    return (
        ["sh", "-c", _TLS_START, "sh", *entrypoint],
        [*command, *TLS_ARGS],
        {**environment, _TLS_CERTIFICATE: certificate.certificate, _TLS_KEY: certificate.key},
    )


def carries_tls(environment: list[str] | None) -> bool:
    """Whether a container's environment (``NAME=value`` items) brings it a certificate."""
    return any(item.startswith(f"{_TLS_CERTIFICATE}=") for item in environment or [])


@contextmanager
def _translated() -> Iterator[None]:
    """docker-py and transport errors as the project's own, classified."""
    try:
        yield
    except docker.errors.APIError as exc:
        text = str(exc.explanation or exc)
        if any(phrase in text.lower() for phrase in _PORT_TAKEN):
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


class DockerRuntime:
    """A ``ServerRuntime`` on the engine named by the usual ``DOCKER_*`` variables."""

    def __init__(
        self,
        instance: str,
        network: str,
        bind_address: str,
        probe_host: str,
        pull: bool = True,
        golden: bool = True,
        client: "docker.DockerClient | None" = None,
    ) -> None:
        self.instance = instance
        self.network = network
        self.bind_address = bind_address
        # Where the service itself connects to published ports.
        self.probe_host = probe_host
        self.pull = pull
        # Whether new servers start on a golden copy rather than running initdb.
        self.golden = golden
        self._client = client
        self._labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: instance}
        # Found or made on the first server; one lookup per process.
        self._network_id: str | None = None
        self._network_lock = threading.Lock()
        # One golden image made at a time in this process; when each base
        # image's could not be made (its servers initialise as before until
        # _GOLDEN_RETRY has passed).
        self._golden_lock = threading.Lock()
        self._golden_failed: dict[str, float] = {}
        # When each golden key's volume, if missing, may next be made again.
        self._golden_refill: dict[str, float] = {}
        self._liveness = _Liveness(self)

    @property
    def client(self) -> "docker.DockerClient":
        # Connect lazily: the service must start (and say so on /readyz) even
        # while the engine is down.
        if self._client is None:
            with _translated():
                self._client = docker.from_env(timeout=30)
        return self._client

    def ping(self) -> None:
        with _translated():
            self.client.ping()

    # -- images ---------------------------------------------------------------

    def has_image(self, image: str) -> bool:
        with _translated():
            return self._image(image) is not None

    def pull_image(self, image: str, progress: Callable[[str], None] | None = None) -> None:
        repository, tag = parse_repository_tag(image)
        try:
            with _translated():
                for event in self.client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                    if "error" in event:
                        raise ImageMissing(f"cannot pull {image}: {event['error']}", image=image)
                    if progress is not None:
                        progress(" ".join(str(event[k]) for k in ("id", "status", "progress") if event.get(k)))
        except (EngineError, EngineRefused) as exc:
            # The registry is unreachable or does not know the image.
            raise ImageMissing(f"cannot pull {image}: {exc.detail}", image=image) from None

    # -- servers ----------------------------------------------------------------

    def ensure_server(self, spec: ServerSpec) -> Endpoint:
        name = container_name(spec.database_id)
        labels = labels_for(self.instance, spec.database_id)
        with _translated():
            retried = False
            while True:
                attrs = self._container(name)
                if attrs is None:
                    container_id = self._create(spec, labels)
                    tls = spec.tls is not None
                elif (attrs.get("State") or {}).get("Running"):
                    return Endpoint(self.probe_host, spec.port, _serves_tls(attrs))
                else:
                    container_id, tls = attrs["Id"], _serves_tls(attrs)
                try:
                    self.client.api.start(container_id)
                    return Endpoint(self.probe_host, spec.port, tls)
                except docker.errors.APIError as exc:
                    # Leave nothing behind: the data is on the volume.
                    self._remove_container(container_id)
                    text = str(exc.explanation or exc).lower()
                    if retried or any(phrase in text for phrase in _PORT_TAKEN):
                        raise
                    # The engine reports a network removed behind our back only
                    # at start: look it up (or make it) again, and the container anew.
                    with self._network_lock:
                        self._network_id = None
                    retried = True

    def _create(self, spec: ServerSpec, labels: dict[str, str]) -> str:
        try:
            base = self.client.api.inspect_image(spec.image)
        except docker.errors.ImageNotFound:
            if not self.pull:
                raise ImageMissing(
                    f"the engine has no image {spec.image} and pulling is off (DBPROV_PULL_IMAGES)",
                    image=spec.image,
                ) from None
            log.info("pulling image %s", spec.image)
            self.pull_image(spec.image)
            base = self.client.api.inspect_image(spec.image)
        golden = self._golden_image(spec, base) if self.golden else None
        lower, made = self._data_volume(spec.database_id, labels, golden)
        # Data that begins initialised (a golden copy or an overlay) rather
        # than by the image's own initdb, at its own $PGDATA.
        initialised = golden is not None or lower is not None
        kwargs = dict(
            name=container_name(spec.database_id),
            command=list(spec.command),
            environment=spec.environment,
            labels=labels,
            ports={"5432/tcp": (self.bind_address, spec.port)},
            volumes=self._mounts(spec.database_id, lower, GOLDEN_PGDATA if initialised else PGDATA),
            restart_policy={"Name": "unless-stopped"},
            network=self._network(),
            mem_limit=spec.memory_limit,
            nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
            pids_limit=spec.pids_limit,
            security_opt=["no-new-privileges:true"],
            detach=True,
        )
        entrypoint = list(base["Config"].get("Entrypoint") or [])
        if initialised:
            user, password = spec.environment["POSTGRES_USER"], spec.environment["POSTGRES_PASSWORD"]
            entrypoint = ["sh", "-c", _FIRST_START, "sh", *entrypoint]
            kwargs.update(
                # The data's owner from the start: single-user mode refuses root,
                # and the entrypoint has nothing to change hands on a copy.
                user="postgres",
                environment={
                    **spec.environment,
                    "PGDATA": GOLDEN_PGDATA,
                    # A verifier, never the password: an error would print the statement.
                    "DBPROV_FIRST_START": f"ALTER ROLE {_identifier(user)} PASSWORD {_literal(scram_verifier(password))}",
                },
                # The volumes the image declares, unused now: a tmpfs rather than
                # an anonymous volume each.
                tmpfs={path: "size=1m" for path in (base["Config"].get("Volumes") or {})},
            )
        if spec.tls is not None:
            entrypoint, kwargs["command"], kwargs["environment"] = tls_entry(
                spec.tls(()), entrypoint, kwargs["command"], kwargs["environment"]
            )
        if initialised or spec.tls is not None:
            # Else none is given: the engine keeps the image's own.
            kwargs["entrypoint"] = entrypoint
        # An overlay made while golden copies were on runs on the plain image if they are off now.
        container_id = self.client.containers.create(golden.image if golden else spec.image, **kwargs).id
        if lower is not None and not _is_golden(self._volume(lower)):
            # The golden volume went between the look and the create: the
            # engine made an empty one of its name for the mount. A server on
            # it has no data; what a new database stands on is made again.
            self._remove_container(container_id)
            if made:
                for volume in (volume_name(spec.database_id), *_layers(spec.database_id)):
                    self._remove_volume(volume)
            if not _is_golden(self._volume(lower)):
                self._remove_volume(lower)
            raise TransientError(f"the golden volume {lower} went while the server of {spec.database_id} was made")
        return container_id

    def _data_volume(
        self, database_id: str, labels: dict[str, str], golden: "_Golden | None"
    ) -> tuple[str | None, bool]:
        """Make the server's data volume if it has none; the golden volume it is
        an overlay on (or None for a volume of its own files), and whether it
        was made now (so holds nothing of the tenant's yet)."""
        found = self._volume(volume_name(database_id))
        if found is not None:
            lower = (found.get("Labels") or {}).get(LABEL_LOWER)
            if lower is not None and not _is_golden(self._volume(lower)):
                # Mounting it by name would make an empty volume in its place.
                raise ServerFailed(
                    f"the golden volume {lower} that the data of {database_id} is an overlay on is gone"
                )
            return lower, False
        if golden is None or golden.volume is None:
            self.client.api.create_volume(name=volume_name(database_id), labels=labels)
            return None, True
        self._make_overlay(database_id, labels, golden.volume["Name"], golden.volume["Mountpoint"])
        return golden.volume["Name"], True

    def _make_overlay(self, database_id: str, labels: dict[str, str], lower: str, lower_path: str) -> None:
        """The data volume of ``database_id`` as an overlay on the golden volume
        ``lower`` (at ``lower_path`` on the engine's host): no file is copied."""
        # Volumes of their own, so that the engine keeps and removes them (a
        # server mounts them too: see _mounts). The engine answers a create
        # of an existing one with it: what a crash left before the overlay
        # was made (still empty) is used again.
        upper, work = (self.client.api.create_volume(name=name, labels=labels) for name in _layers(database_id))
        self.client.api.create_volume(
            name=volume_name(database_id),
            driver="local",
            driver_opts={
                "type": "overlay",
                "device": "overlay",
                "o": f"lowerdir={lower_path},upperdir={upper['Mountpoint']},workdir={work['Mountpoint']}",
            },
            labels={**labels, LABEL_LOWER: lower},
        )

    @staticmethod
    def _mounts(database_id: str, lower: str | None, pgdata: str) -> dict:
        """The volumes of a server: its own data at ``pgdata``, or an overlay
        holding it (at GOLDEN_PGDATA) and, read-only, every volume the overlay
        is made of. The engine knows an overlay's volumes only by these
        mounts: without them it would count them unused, and a `docker volume
        prune` would remove the golden files, or a server's own changes."""
        if lower is None:
            return {volume_name(database_id): {"bind": pgdata, "mode": "rw"}}
        upper, work = _layers(database_id)
        return {
            # nocopy: an overlay is never filled from the image's files.
            volume_name(database_id): {"bind": GOLDEN_HOME, "mode": "rw,nocopy"},
            lower: {"bind": f"{_LAYERS_AT}/lower", "mode": "ro,nocopy"},
            upper: {"bind": f"{_LAYERS_AT}/upper", "mode": "ro,nocopy"},
            work: {"bind": f"{_LAYERS_AT}/work", "mode": "ro,nocopy"},
        }

    def _golden_image(self, spec: ServerSpec, base: dict) -> "_Golden | None":
        """The golden copy for ``spec``'s image and superuser, made if need be; None
        if it cannot be made (its servers then run initdb, as without one)."""
        key = self._golden_key(spec, base)
        tag = f"{GOLDEN_REPOSITORY}:{key}"
        if time.monotonic() < self._golden_failed.get(base["Id"], 0.0):
            return None
        with self._golden_lock:
            image = self._image(tag)
            if image is None:
                try:
                    self._make_golden(spec, base, key)
                    image = self._image(tag) or {}
                except (docker.errors.APIError, requests.exceptions.RequestException, GoldenFailed) as exc:
                    self._golden_failed[base["Id"]] = time.monotonic() + _GOLDEN_RETRY
                    log.warning(
                        "no golden image for %s (servers on it run initdb, about 1 s more each): %s",
                        spec.image, exc,
                    )
                    return None
                self._prune_golden(spec.image, base["Id"])
                # Its volume was just tried: not again at once.
                self._golden_refill[key] = time.monotonic() + _GOLDEN_RETRY
        # Asked at every use: a volume removed behind our back must not be
        # mounted by name, which would make an empty one in its place.
        labels = image.get("Config", {}).get("Labels") or {}
        name = labels.get(LABEL_LOWER)
        volume = self._volume(name) if name else None
        if name and not _is_golden(volume) and time.monotonic() >= self._golden_refill.get(key, 0.0):
            # Its files are the image's, so a volume made again from it is the
            # same: tried again now and then (an overlay may have failed for a
            # passing reason), not given up on for the image's life.
            self._golden_refill[key] = time.monotonic() + _GOLDEN_RETRY
            with self._golden_lock:
                self._refill_golden_volume(spec, base, key, image["Id"], name, labels)
            volume = self._volume(name)
        if _is_golden(volume) and self._container(f"{GOLDEN_REPOSITORY}-{key}") is not None:
            # Being made again by another process (its builder is the lock):
            # labelled, but perhaps not filled yet. Not to stand on now.
            volume = None
        return _Golden(tag, volume if _is_golden(volume) else None)

    @staticmethod
    def _golden_key(spec: ServerSpec, base: dict) -> str:
        """What a golden copy depends on: the image, and the superuser initdb makes."""
        superuser = spec.environment.get("POSTGRES_USER", "postgres")
        return hashlib.sha256(f"{_GOLDEN_FORMAT}\0{base['Id']}\0{superuser}".encode()).hexdigest()[:16]

    def _make_golden(self, spec: ServerSpec, base: dict, key: str) -> None:
        """Initialise a data directory with the image's own entrypoint, stop it
        cleanly, commit it, fill its golden volume from it, and only then tag it
        ``dbprov-golden:<key>``: the tag says both are whole."""
        name = f"{GOLDEN_REPOSITORY}-{key}"
        tag = f"{GOLDEN_REPOSITORY}:{key}"
        started = time.monotonic()
        container = self._golden_builder(spec, base, name)
        if container is None or self.has_image(tag):
            # Another process made it meanwhile (or is done trying).
            if container is not None:
                self._remove_container(container)
            if not self.has_image(tag):
                raise GoldenFailed("another process could not make it")
            return
        # A volume of this build's own: a build never touches one that
        # servers of an earlier build of the same key may stand on.
        volume = f"{name}-{secrets.token_hex(4)}"
        golden_labels = {
            LABEL_GOLDEN_OF: spec.image, LABEL_GOLDEN_BASE: base["Id"], LABEL_GOLDEN_FORMAT: _GOLDEN_FORMAT,
        }
        image = None
        try:
            self.client.api.start(container)
            deadline = time.monotonic() + 120
            while _INIT_DONE not in self.client.api.logs(container):
                if not self.client.api.inspect_container(container)["State"]["Running"]:
                    raise GoldenFailed(f"initialisation exited: {self._tail(container)}")
                if time.monotonic() > deadline:
                    raise GoldenFailed(f"initialisation took over 120 s: {self._tail(container)}")
                time.sleep(0.05)
            # A clean shutdown ends with a checkpoint: the copies need no recovery.
            self.client.api.stop(container, timeout=30)
            if self.client.api.inspect_container(container)["State"]["ExitCode"] != 0:
                raise GoldenFailed(f"the server did not stop cleanly: {self._tail(container)}")
            self.client.api.put_archive(container, GOLDEN_PGDATA, _tar_of_empty(GOLDEN_MARK))
            image = self.client.api.commit(
                container,
                # No password of any kind in the image; the base's name and id
                # for pruning, and the golden volume it fills.
                changes=[
                    "ENV POSTGRES_PASSWORD=",
                    "LABEL " + " ".join(
                        f'{label}="{value}"' for label, value in {**golden_labels, LABEL_LOWER: volume}.items()
                    ),
                ],
            )["Id"]
            self._fill_golden_volume(image, volume, f"{name}-probe", golden_labels)
            self.client.api.tag(image, GOLDEN_REPOSITORY, key)
            image = None  # tagged: kept
        finally:
            self._remove_container(container)
            if image is not None:
                # Never tagged, so unknown to every server and every other build.
                self._remove_volume(volume)
                self.client.api.remove_image(image, force=True)
        log.info("golden image for %s made in %.1f s", spec.image, time.monotonic() - started)

    def _refill_golden_volume(
        self, spec: ServerSpec, base: dict, key: str, image: str, name: str, labels: dict[str, str]
    ) -> None:
        """The golden volume ``name`` of ``image`` made again, one process at a
        time (the builder's name is the lock), unless another just did."""
        lock = self._golden_builder(spec, base, f"{GOLDEN_REPOSITORY}-{key}")
        if lock is None:
            return
        try:
            if not _is_golden(self._volume(name)):
                golden_labels = {
                    label: labels[label] for label in (LABEL_GOLDEN_OF, LABEL_GOLDEN_BASE, LABEL_GOLDEN_FORMAT)
                }
                self._fill_golden_volume(image, name, f"{GOLDEN_REPOSITORY}-{key}-probe", golden_labels)
                if _is_golden(self._volume(name)):
                    log.info("golden volume %s of %s made again", name, spec.image)
        finally:
            self._remove_container(lock)

    def _fill_golden_volume(self, image: str, name: str, probe: str, labels: dict[str, str]) -> None:
        """The golden volume ``name``, filled from ``image``, if an overlay on it
        works on this engine as a server uses it; else none, and servers get copies."""

        def clear_probe() -> None:
            self._remove_container(probe)
            for volume in (volume_name(probe), *_layers(probe)):
                self._remove_volume(volume)

        # Whatever a crashed build of this key left.
        clear_probe()
        try:
            lower = self.client.api.create_volume(name=name, labels=labels)
            self._make_overlay(probe, labels, name, lower["Mountpoint"])
            # Created, the engine fills the empty golden volume from the image;
            # started, it mounts an overlay on it, where the server's own user
            # reads the golden files and writes its own.
            self.client.api.create_container(
                image,
                name=probe,
                user="postgres",
                entrypoint=["sh", "-c"],
                command=["test -s /probe/data/PG_VERSION && touch /probe/data/probe && rm /probe/data/probe "
                         f"&& rm /probe/data/{GOLDEN_MARK} && test ! -e /probe/data/{GOLDEN_MARK}"],
                labels=labels,
                host_config=self.client.api.create_host_config(
                    network_mode="none",
                    binds=[f"{name}:{GOLDEN_HOME}:rw", f"{volume_name(probe)}:/probe:rw,nocopy"],
                ),
                volumes=[GOLDEN_HOME, "/probe"],
            )
            self.client.api.start(probe)
            exit_code = self.client.api.wait(probe, timeout=60)["StatusCode"]
            if exit_code != 0:
                raise GoldenFailed(f"the golden data did not work through an overlay (exit code {exit_code})")
        except (docker.errors.APIError, requests.exceptions.RequestException, GoldenFailed) as exc:
            log.warning("servers get copies of the golden data: an overlay on it does not work here: %s", exc)
            failed = True
        else:
            failed = False
        finally:
            clear_probe()
        if failed:
            # After the probe, which mounts it.
            self._remove_volume(name)

    def _golden_builder(self, spec: ServerSpec, base: dict, name: str) -> str | None:
        """The container that initialises a golden copy; None once another
        process's is done. The fixed name keeps builds of one key to one at a time
        across processes; one older than any build takes was left by a crash."""
        while True:
            try:
                return self.client.api.create_container(
                    spec.image,
                    name=name,
                    command=["postgres"],
                    # Not the installation's labels: it belongs to no installation
                    # (every one on this engine shares the golden images), and
                    # the next build clears one that a crash left.
                    labels={LABEL_GOLDEN_OF: spec.image},
                    environment={
                        **spec.environment,
                        # Thrown away: each server's first start sets its own.
                        "POSTGRES_PASSWORD": secrets.token_urlsafe(32),
                        "PGDATA": GOLDEN_PGDATA,
                    },
                    host_config=self.client.api.create_host_config(
                        network_mode="none",
                        tmpfs={path: "size=1m" for path in (base["Config"].get("Volumes") or {})},
                    ),
                )["Id"]
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
            other = self._container(name)
            if other is None:
                return None
            if time.time() - _when(other["Created"]).timestamp() > _GOLDEN_STALE:
                self._remove_container(other["Id"])
                continue
            while self._container(name) is not None:
                time.sleep(0.1)
            return None

    def _prune_golden(self, image: str, base_id: str) -> None:
        """Drop the golden images of earlier versions of ``image`` (it has
        changed) or of an earlier way of making them, once no server uses them;
        and golden volumes that no golden image names and no server stands on."""
        of_image = {"label": f"{LABEL_GOLDEN_OF}={image}"}
        named = set()
        for found in self.client.api.images(filters=of_image):
            labels = found.get("Labels") or {}
            if (labels.get(LABEL_GOLDEN_BASE), labels.get(LABEL_GOLDEN_FORMAT)) != (base_id, _GOLDEN_FORMAT):
                try:
                    self.client.api.remove_image(found["Id"])
                    continue
                except docker.errors.APIError:
                    pass  # still used by a server of that version: tried again next time
            named.add(labels.get(LABEL_LOWER))
        for volume in self.client.api.volumes(filters=of_image).get("Volumes") or []:
            if volume["Name"] in named:
                continue
            # A server mounts the golden volume it stands on, but data kept
            # without its server (a failed database) does not: look for it.
            standing = self.client.api.volumes(filters={"label": f"{LABEL_LOWER}={volume['Name']}"})
            if not standing.get("Volumes"):
                try:
                    self._remove_volume(volume["Name"])
                except docker.errors.APIError:
                    pass  # in use after all: tried again next time

    def prune_caches(self) -> list[str]:
        removed = []
        of_golden = {"label": LABEL_GOLDEN_OF}
        with _translated():
            for image in self.client.api.images(filters=of_golden):
                try:
                    self.client.api.remove_image(image["Id"])
                except docker.errors.APIError:
                    continue  # a server's container still uses it
                removed.extend(image.get("RepoTags") or [image["Id"]])
            for volume in self.client.api.volumes(filters=of_golden).get("Volumes") or []:
                # A server's container holds the golden volume it stands on;
                # data kept without its server (a failed database) is looked for.
                if self.client.api.volumes(filters={"label": f"{LABEL_LOWER}={volume['Name']}"}).get("Volumes"):
                    continue
                try:
                    self.client.api.remove_volume(volume["Name"])
                except docker.errors.APIError:
                    continue  # in use after all
                removed.append(volume["Name"])
        return removed

    def _tail(self, container: str) -> str:
        return self.client.api.logs(container, tail=10).decode("utf-8", errors="replace").strip()

    def stop_server(self, database_id: str) -> None:
        with _translated():
            try:
                # The postgres images stop on SIGINT (a fast shutdown) within
                # the timeout; after it the engine kills the server.
                self.client.api.stop(container_name(database_id), timeout=30)
            except docker.errors.NotFound:
                pass  # no server, nothing running

    def start_server(self, database_id: str) -> None:
        with _translated():
            try:
                self.client.api.start(container_name(database_id))
            except docker.errors.NotFound:
                raise NotFound(f"database {database_id} has no server to start") from None

    def remove_server(self, database_id: str, keep_data: bool = False) -> None:
        with _translated():
            jobs = self.client.api.containers(
                all=True, filters={"label": [f"{LABEL_DATABASE_ID}={database_id}", LABEL_JOB]}
            )
            for job in jobs:
                self._remove_container(job["Id"])
            self._remove_container(container_name(database_id))
            if not keep_data:
                # The overlay first: the volumes it is made of are in use until it goes.
                for volume in (volume_name(database_id), *_layers(database_id)):
                    self._remove_volume(volume)

    def inspect_server(self, database_id: str) -> ServerInfo | None:
        volume = volume_name(database_id)
        with _translated():
            attrs = self._container(container_name(database_id))
            if attrs is None:
                has_data = self._volume_exists(volume)
                return ServerInfo(database_id, ABSENT, has_data, "no container") if has_data else None
        # A volume a container mounts cannot be removed: no second question to
        # the engine (a warm pool's claim asks this of its member).
        has_data = any(m.get("Name") == volume for m in attrs.get("Mounts") or [])
        state = attrs.get("State") or {}
        return _server_info(
            database_id,
            status=state.get("Status", "unknown"),
            exit_code=state.get("ExitCode"),
            restarts=attrs.get("RestartCount") or 0,
            has_data=has_data,
        )

    def runs_unbroken(self, database_id: str) -> bool | None:
        return self._liveness.runs_unbroken(database_id)

    def list_servers(self) -> list[ServerInfo]:
        filters = {"label": [f"{k}={v}" for k, v in self._labels.items()]}
        with _translated():
            containers = self.client.api.containers(all=True, filters=filters)
            volumes = self.client.api.volumes(filters=filters).get("Volumes") or []
        with_data = {(v.get("Labels") or {}).get(LABEL_DATABASE_ID) for v in volumes}
        servers = {}
        for item in containers:
            labels = item.get("Labels") or {}
            database_id = labels.get(LABEL_DATABASE_ID)
            if database_id is None or LABEL_JOB in labels:
                continue
            servers[database_id] = _server_info(
                database_id,
                status=item.get("State", "unknown"),
                # The listing has no exit code field, only this text: "Exited (1) 3 minutes ago".
                exit_code=_exit_code(item.get("Status", "")),
                restarts=0,
                has_data=database_id in with_data,
            )
        for database_id in with_data - set(servers) - {None}:
            servers[database_id] = ServerInfo(database_id, ABSENT, True, "no container")
        return list(servers.values())

    def server_logs(self, database_id: str, tail: int = 30) -> str:
        try:
            with _translated():
                raw = self.client.api.logs(container_name(database_id), tail=tail)
        except (EngineRefused, EngineError, RuntimeUnavailable):
            return "(logs unavailable)"
        return raw.decode("utf-8", errors="replace")

    def endpoint(self, database_id: str) -> Endpoint | None:
        with _translated():
            attrs = self._container(container_name(database_id))
        bindings = ((attrs or {}).get("HostConfig") or {}).get("PortBindings") or {}
        published = bindings.get("5432/tcp") or []
        if not published or not published[0].get("HostPort"):
            return None
        return Endpoint(self.probe_host, int(published[0]["HostPort"]), _serves_tls(attrs))

    # -- jobs -------------------------------------------------------------------

    def run_job(
        self,
        database_id: str,
        command: list[str],
        environment: dict[str, str] | None = None,
        input_file: Path | None = None,
        timeout: float = 300.0,
    ) -> JobResult:
        with _translated():
            container = self._beside(database_id, command, environment)
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
                self._remove_container(container.id)

    def stream_job(
        self, database_id: str, command: list[str], environment: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        with _translated():
            container = self._beside(database_id, command, environment)
        yield from self._stream(container, command)

    def _stream(self, container, command: list[str]) -> Iterator[bytes]:
        """Start a created job container and yield its standard output; removed at the end."""
        output = None
        try:
            with _translated():
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
            with _translated():
                self._remove_container(container.id)

    def _beside(self, database_id: str, command: list[str], environment: dict[str, str] | None):
        """A job container from the server's image, in its network namespace, with
        its volumes where it has them and its $PGDATA."""
        server = self._container(container_name(database_id))
        if server is None:
            raise NotFound(f"database {database_id} has no server")
        pgdata = next(
            (item.split("=", 1)[1] for item in server["Config"].get("Env") or [] if item.startswith("PGDATA=")),
            PGDATA,
        )
        return self._job_container(
            database_id,
            server["Config"]["Image"],
            command,
            {
                mount["Name"]: {"bind": mount["Destination"], "mode": "rw" if mount.get("RW") else "ro"}
                for mount in server.get("Mounts") or []
                if mount.get("Type") == "volume"
            },
            network_mode=f"container:{container_name(database_id)}",
            environment={"PGDATA": pgdata, **(environment or {})},
        )

    def copy_data(self, source_id: str, target_id: str, image: str) -> int:
        with _translated():
            source = self._volume(volume_name(source_id))
            if source is None:
                raise NotFound(f"{source_id} has no data to copy")
            # A copy is a volume of its own files: an overlay holds them in data/.
            inside = "data/" if LABEL_LOWER in (source.get("Labels") or {}) else ""
            self.client.api.create_volume(name=volume_name(target_id), labels=labels_for(self.instance, target_id))
            container = self._job_container(
                target_id,
                image,
                # -a keeps owners and modes: the server runs as its own user on
                # them. The size is the copy's, for the snapshot's record.
                ["sh", "-c", f"cp -a /source/{inside}. /target/ && du -sb /target | cut -f1"],
                {
                    volume_name(source_id): {"bind": "/source", "mode": "ro"},
                    volume_name(target_id): {"bind": "/target", "mode": "rw"},
                },
                network_mode="none",
            )
            try:
                container.start()
                status = container.wait(timeout=3600)
                output = container.logs().decode("utf-8", errors="replace").strip()
            finally:
                self._remove_container(container.id)
        if status.get("StatusCode", -1) != 0 or not output.splitlines()[-1:][0].isdigit():
            raise EngineError(f"copying the data of {source_id} failed: {output}")
        return int(output.splitlines()[-1])

    def _job_container(
        self,
        database_id: str,
        image: str,
        command: list[str],
        volumes: dict,
        network_mode: str,
        environment: dict[str, str] | None = None,
    ):
        return self.client.containers.create(
            image,
            entrypoint=command[:1],
            command=command[1:],
            name=f"{container_name(database_id)}-job-{secrets.token_hex(3)}",
            labels={**labels_for(self.instance, database_id), LABEL_JOB: "true"},
            volumes=volumes,
            network_mode=network_mode,
            environment=environment or {},
            security_opt=["no-new-privileges:true"],
        )

    # -- engine objects ------------------------------------------------------------

    def _container(self, name_or_id: str) -> dict | None:
        try:
            return self.client.api.inspect_container(name_or_id)
        except docker.errors.NotFound:
            return None

    def _remove_container(self, name_or_id: str) -> None:
        try:
            # v=True: anonymous volumes an image declares go with it.
            self.client.api.remove_container(name_or_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # 409: removal already in progress, which is what we want.
            if exc.status_code != 409:
                raise

    def _image(self, name: str) -> dict | None:
        try:
            return self.client.api.inspect_image(name)
        except docker.errors.ImageNotFound:
            return None

    def _volume(self, name: str) -> dict | None:
        try:
            return self.client.api.inspect_volume(name)
        except docker.errors.NotFound:
            return None

    def _volume_exists(self, name: str) -> bool:
        return self._volume(name) is not None

    def _remove_volume(self, name: str) -> None:
        try:
            self.client.api.remove_volume(name)
        except docker.errors.NotFound:
            pass

    def _network(self) -> str:
        """The installation's bridge network, whose containers cannot reach each other."""
        with self._network_lock:
            if self._network_id is None:
                self._network_id = self._ensure_network()
            return self._network_id

    def _ensure_network(self) -> str:
        found = self._networks()
        if not found:
            self.client.api.create_network(
                self.network,
                driver="bridge",
                labels=self._labels,
                # No traffic between containers on this bridge: one tenant's
                # server cannot reach another's. Published ports still work.
                options={"com.docker.network.bridge.enable_icc": "false"},
                check_duplicate=True,
            )
            found = self._networks()
        # The engine does not refuse a second network of the same name, so
        # processes starting together may each make one: all of them keep
        # the oldest and drop the rest.
        keep, *extra = sorted(found, key=lambda n: (n["Created"], n["Id"]))
        for network in extra:
            try:
                self.client.api.remove_network(network["Id"])
            except docker.errors.APIError:
                pass  # in use, or already gone: the next caller tries again
        return keep["Id"]

    def _networks(self) -> list[dict]:
        # The engine's name filter matches substrings.
        return [n for n in self.client.api.networks(names=[self.network]) if n["Name"] == self.network]


class _Liveness:
    """Which of the installation's servers run, followed from the engine's events.

    Started by the first question, on a thread of its own: it subscribes to
    the containers' start, die and destroy events, then lists the containers,
    then applies each event as it comes (all events since the subscription, in
    order, so the listing cannot hide one). It subscribes again every minute,
    so a stream that hangs without an error is trusted for a minute at most;
    while it is not subscribed, it does not know.
    """

    def __init__(self, runtime: DockerRuntime) -> None:
        # Weak: a runtime that is dropped (tests make many) ends the thread.
        self._runtime = weakref.ref(runtime)
        self._filters = {"label": [f"{LABEL_INSTANCE}={runtime.instance}"]}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running: dict[str, bool] = {}
        # Died since they were first seen running: a crash, even one the
        # restart policy recovered from, is reason enough not to trust it.
        self._died: set[str] = set()
        self._fresh_until = 0.0

    def runs_unbroken(self, database_id: str) -> bool | None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._follow, name="dbprov-engine-events", daemon=True)
                self._thread.start()
            if time.monotonic() > self._fresh_until:
                return None
            if database_id in self._died:
                return False
            return self._running.get(database_id)

    def _follow(self) -> None:
        while True:
            runtime = self._runtime()
            if runtime is None:
                return
            try:
                self._subscribe(runtime.client)
            except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
                log.debug("engine events interrupted: %s", exc)
                time.sleep(1.0)
            finally:
                with self._lock:
                    self._fresh_until = 0.0
            del runtime

    def _subscribe(self, client: "docker.DockerClient") -> None:
        stream = client.api.events(
            decode=True, filters={**self._filters, "type": "container", "event": ["start", "die", "destroy"]}
        )
        closer = threading.Timer(_EVENTS_RESUBSCRIBE, stream.close)
        closer.daemon = True
        closer.start()
        try:
            listed = client.api.containers(all=True, filters=self._filters)
            with self._lock:
                self._running = {
                    labels[LABEL_DATABASE_ID]: item.get("State") == "running"
                    for item in listed
                    if LABEL_DATABASE_ID in (labels := item.get("Labels") or {}) and LABEL_JOB not in labels
                }
                self._died &= set(self._running)
                self._fresh_until = time.monotonic() + _EVENTS_RESUBSCRIBE
            for event in stream:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                database_id = attributes.get(LABEL_DATABASE_ID)
                if database_id is None or LABEL_JOB in attributes:
                    continue
                action = event.get("Action")
                with self._lock:
                    if action == "start":
                        self._running[database_id] = True
                    elif action == "die":
                        self._running[database_id] = False
                        self._died.add(database_id)
                    else:  # destroy: a server made anew under this id starts afresh
                        self._running.pop(database_id, None)
                        self._died.discard(database_id)
        finally:
            closer.cancel()
            stream.close()


class _Golden(NamedTuple):
    """A golden copy: its image, and its volume as the engine describes it
    (None where servers get copies instead of overlays)."""

    image: str
    volume: dict | None


def _is_golden(volume: dict | None) -> bool:
    """Whether ``volume`` is a golden volume, not an empty one of its name."""
    return volume is not None and LABEL_GOLDEN_BASE in (volume.get("Labels") or {})


def _layers(database_id: str) -> tuple[str, str]:
    """The volumes an overlay data volume is made of: its changes, and the
    overlay's own working directory."""
    return f"dbprov-{database_id}-upper", f"dbprov-{database_id}-work"


def _tar_of_empty(name: str) -> bytes:
    """A tar archive holding one empty file ``name``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.mode = 0o600
        archive.addfile(info)
    return buffer.getvalue()


def _serves_tls(attrs: dict) -> bool:
    """Whether a server's container was made with a certificate."""
    return carries_tls((attrs.get("Config") or {}).get("Env"))


def _when(text: str | None) -> datetime:
    """The engine's RFC 3339 times, with their nanoseconds cut to what datetime holds."""
    if not text:
        return datetime.min.replace(tzinfo=timezone.utc)
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        return datetime.min.replace(tzinfo=timezone.utc)
    fraction = (match[2] or "0")[:6].ljust(6, "0")
    zone = "+00:00" if match[3] == "Z" else match[3]
    return datetime.fromisoformat(f"{match[1]}.{fraction}{zone}")


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


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


def _server_info(
    database_id: str, status: str, exit_code: int | None, restarts: int, has_data: bool
) -> ServerInfo:
    """Docker's container state as a server state."""
    reason = status
    if exit_code and status in ("exited", "dead", "restarting"):
        reason += f" (exit code {exit_code})"
    if restarts:
        reason += f" after {restarts} restart(s)"
    if status == "running":
        state = RUNNING
    elif status in ("created", "paused") or (status == "exited" and exit_code == 0):
        # Never started, or shut down cleanly (a stop, or the engine's own restart).
        state = STOPPED
    else:
        # Exited with an error, dead, or being revived by the restart policy.
        state = CRASHED
    return ServerInfo(database_id, state, has_data, reason, restarts)


def _exit_code(status_text: str) -> int | None:
    if status_text.startswith("Exited ("):
        return int(status_text[len("Exited ("):].split(")", 1)[0])
    return None
