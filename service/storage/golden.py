"""Golden images: a data directory initialised once per image and superuser, kept in a
local image (``dbprov-golden:<key>``, made by ``docker commit``) that new servers start from.

A storage backend fills its bases from them; servers on them skip initdb.
The image holds no password of any kind: it carries a mark (``GOLDEN_MARK``)
in its data directory until a server's first start has set its superuser's
own password (see ``runtime.entry``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import secrets
import tarfile
import time
from typing import TYPE_CHECKING, Callable

import docker.errors

from ..errors import EngineError
from ..runtime.engine import when

if TYPE_CHECKING:
    from ..runtime.engine import Engine
    from ..runtime.protocol import ServerSpec

log = logging.getLogger(__name__)


class GoldenFailed(EngineError):
    """A golden image could not be made; its servers initialise the usual way."""


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
# On an overlay data volume: the golden volume under it. On a golden image:
# its golden volume.
LABEL_LOWER = "io.dbprov.lower"
# In a golden copy until its first start has set the superuser's password.
GOLDEN_MARK = "dbprov-golden"
# Bumped when the way a golden image is made changes, so old ones are not used.
_GOLDEN_FORMAT = "3"
# Seconds after which a golden build still under way was left by a crash.
_GOLDEN_STALE = 180.0
# What the official entrypoint prints once initdb and the init scripts are
# done, and what the server it then execs prints once it is up.
_INIT_DONE = b"init process complete"
_READY = b"ready to accept connections"

# Fills the golden volume of a golden image just committed: (the image, the
# volume's name, the name of the container that tries it, its labels).
Filler = Callable[[str, str, str, dict], None]


def golden_key(spec: "ServerSpec", base: dict) -> str:
    """What a golden copy depends on: the image, the superuser initdb makes,
    and the rest of the environment the entrypoint initialises it with (the
    first database's name)."""
    environment = "\0".join(f"{name}={value}" for name, value in sorted(spec.extra_environment.items()))
    key = f"{_GOLDEN_FORMAT}\0{base['Id']}\0{spec.superuser}\0{environment}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def golden_labels(labels: dict[str, str]) -> dict[str, str]:
    """Of a golden image's labels, those its golden volume carries too."""
    return {label: labels[label] for label in (LABEL_GOLDEN_OF, LABEL_GOLDEN_BASE, LABEL_GOLDEN_FORMAT)}


def make_golden(engine: "Engine", spec: "ServerSpec", base: dict, key: str, fill: Filler) -> None:
    """Initialise a data directory with the image's own entrypoint, stop it
    cleanly, commit it, ``fill`` its golden volume from it, and only then tag it
    ``dbprov-golden:<key>``: the tag says both are whole."""
    api = engine.client.api
    name = f"{GOLDEN_REPOSITORY}-{key}"
    tag = f"{GOLDEN_REPOSITORY}:{key}"
    started = time.monotonic()
    container = builder(engine, spec, base, name)
    if container is None or engine.has_image(tag):
        # Another process made it meanwhile (or is done trying).
        if container is not None:
            engine.remove_container(container)
        if not engine.has_image(tag):
            raise GoldenFailed("another process could not make it")
        return
    # A volume of this build's own: a build never touches one that
    # servers of an earlier build of the same key may stand on.
    volume = f"{name}-{secrets.token_hex(4)}"
    labels = {LABEL_GOLDEN_OF: spec.image, LABEL_GOLDEN_BASE: base["Id"], LABEL_GOLDEN_FORMAT: _GOLDEN_FORMAT}
    image = None
    try:
        api.start(container)
        deadline = time.monotonic() + 120
        # The server's own word after the entrypoint's: the entrypoint says it
        # is done before it execs the server, and a stop sent in between
        # reaches a shell that ignores it (a kill 30 s later, exit code 137).
        while _READY not in api.logs(container).partition(_INIT_DONE)[2]:
            if not api.inspect_container(container)["State"]["Running"]:
                raise GoldenFailed(f"initialisation exited: {engine.tail(container)}")
            if time.monotonic() > deadline:
                raise GoldenFailed(f"initialisation took over 120 s: {engine.tail(container)}")
            time.sleep(0.05)
        # A clean shutdown ends with a checkpoint: the copies need no recovery.
        api.stop(container, timeout=30)
        exit_code = api.inspect_container(container)["State"]["ExitCode"]
        if exit_code != 0:
            raise GoldenFailed(f"the server did not stop cleanly (exit code {exit_code}): {engine.tail(container)}")
        api.put_archive(container, GOLDEN_PGDATA, _tar_of_empty(GOLDEN_MARK))
        image = api.commit(
            container,
            # No password of any kind in the image; the base's name and id
            # for pruning, and the golden volume it fills.
            changes=[
                "ENV POSTGRES_PASSWORD=",
                "LABEL " + " ".join(
                    f'{label}="{value}"' for label, value in {**labels, LABEL_LOWER: volume}.items()
                ),
            ],
        )["Id"]
        fill(image, volume, f"{name}-probe", labels)
        api.tag(image, GOLDEN_REPOSITORY, key)
        image = None  # tagged: kept
    finally:
        engine.remove_container(container)
        if image is not None:
            # Never tagged, so unknown to every server and every other build.
            engine.remove_volume(volume)
            api.remove_image(image, force=True)
    log.info("golden image for %s made in %.1f s", spec.image, time.monotonic() - started)


def builder(engine: "Engine", spec: "ServerSpec", base: dict, name: str) -> str | None:
    """The container that initialises a golden copy; None once another
    process's is done. The fixed name keeps builds of one key to one at a time
    across processes; one older than any build takes was left by a crash."""
    api = engine.client.api
    while True:
        try:
            return api.create_container(
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
                host_config=api.create_host_config(
                    network_mode="none",
                    tmpfs={path: "size=1m" for path in (base["Config"].get("Volumes") or {})},
                ),
            )["Id"]
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        other = engine.container(name)
        if other is None:
            return None
        if time.time() - when(other["Created"]).timestamp() > _GOLDEN_STALE:
            engine.remove_container(other["Id"])
            continue
        while engine.container(name) is not None:
            time.sleep(0.1)
        return None


def prune_golden_images(engine: "Engine", image: str, base_id: str) -> set[str]:
    """Drop the golden images of earlier versions of ``image`` (it has changed)
    or of an earlier way of making them, once no server uses them; the golden
    volumes that those kept name."""
    named = set()
    for found in engine.client.api.images(filters={"label": f"{LABEL_GOLDEN_OF}={image}"}):
        labels = found.get("Labels") or {}
        if (labels.get(LABEL_GOLDEN_BASE), labels.get(LABEL_GOLDEN_FORMAT)) != (base_id, _GOLDEN_FORMAT):
            try:
                engine.client.api.remove_image(found["Id"])
                continue
            except docker.errors.APIError:
                pass  # still used by a server of that version: tried again next time
        named.add(labels.get(LABEL_LOWER))
    return named


def prune_all_golden_images(engine: "Engine") -> list[str]:
    """Remove every golden image no server's container uses; what went."""
    removed = []
    for image in engine.client.api.images(filters={"label": LABEL_GOLDEN_OF}):
        try:
            engine.client.api.remove_image(image["Id"])
        except docker.errors.APIError:
            continue  # a server's container still uses it
        removed.extend(image.get("RepoTags") or [image["Id"]])
    return removed


def _tar_of_empty(name: str) -> bytes:
    """A tar archive holding one empty file ``name``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.mode = 0o600
        archive.addfile(info)
    return buffer.getvalue()
