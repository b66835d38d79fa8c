"""What the Swarm runtime decides without an engine: the image its volume
helper runs, on an engine stand-in that knows some images."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import docker.errors
import pytest

from service.errors import EngineError
from service.runtime.protocol import CRASHED, RUNNING
from service.runtime.swarm import SwarmRuntime
from service.runtime.swarm_services import server_info

LOCAL_BUILD = "sha256:" + "1" * 64
DIGEST = "sha256:" + "2" * 64


class Images:
    """The part of docker-py's low-level API the helper's lookup uses; a pull
    brings what the registry has, if anything."""

    def __init__(self, images: dict[str, dict], registry: dict[str, dict] | None = None) -> None:
        self.images = images
        self.registry = registry or {}
        self.pulled: list[str] = []

    def inspect_image(self, name: str) -> dict:
        if name not in self.images:
            raise docker.errors.ImageNotFound(f"No such image: {name}")
        return self.images[name]

    def pull(self, repository: str, tag: str, stream: bool, decode: bool):
        name = f"{repository}:{tag}"
        self.pulled.append(name)
        if name not in self.registry:
            return iter([{"error": "manifest unknown"}])
        self.images[name] = self.registry[name]
        return iter([{"status": "Downloaded newer image"}])


def runtime(helper_image: str, images: dict[str, dict], registry: dict[str, dict] | None = None,
            pull: bool = True) -> SwarmRuntime:
    return SwarmRuntime(instance="test", helper_image=helper_image, pull=pull,
                        client=SimpleNamespace(api=Images(images, registry)))


def test_the_helper_runs_by_the_digest_of_the_managers_image():
    pulled = {"Id": LOCAL_BUILD, "RepoDigests": [f"mirror.example/python@sha256:{'3' * 64}",
                                                 f"python@{DIGEST}"]}
    assert runtime("python:3.11-slim", {"python:3.11-slim": pulled})._pinned_helper() == f"python@{DIGEST}"
    pushed = {"Id": LOCAL_BUILD, "RepoDigests": [f"registry.example:5000/dbprov@{DIGEST}"]}
    helper = runtime("registry.example:5000/dbprov:1", {"registry.example:5000/dbprov:1": pushed})
    assert helper._pinned_helper() == f"registry.example:5000/dbprov@{DIGEST}"


def test_a_local_build_runs_by_its_image_id():
    # No registry has it (the stand-in images here): nodes must hold that very image.
    built = {"Id": LOCAL_BUILD, "RepoDigests": []}
    assert runtime("python:3.11-slim", {"python:3.11-slim": built})._pinned_helper() == LOCAL_BUILD


def test_a_helper_the_manager_lacks_is_pulled_there_once_and_pinned():
    # As dbprov's own image is where Swarm pulled it for dbprov's service: by digest, untagged.
    image = "registry.example/dbprov:1"
    helper = runtime(image, {}, {image: {"Id": LOCAL_BUILD, "RepoDigests": [f"registry.example/dbprov@{DIGEST}"]}})
    assert helper._pinned_helper() == helper._pinned_helper() == f"registry.example/dbprov@{DIGEST}"
    assert helper.client.api.pulled == [image]


@pytest.mark.parametrize("pull", [True, False])
def test_a_helper_the_manager_cannot_have_holds_the_removal_up(pull):
    # A transient error: the deletion is tried again once the image is there.
    helper = runtime("python:3.11-slim", {}, pull=pull)
    with pytest.raises(EngineError, match="DBPROV_SWARM_HELPER_IMAGE"):
        helper._pinned_helper()
    assert helper.client.api.pulled == (["python:3.11-slim"] if pull else [])


def task(state: str, err: str | None, created: str, desired: str = "running") -> dict:
    return {"DesiredState": desired, "CreatedAt": created, "Status": {"State": state, "Err": err}}


def test_a_start_held_back_by_its_own_stopped_task_s_port_is_starting_within_the_grace():
    def at(seconds_ago: float) -> str:
        return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def state(seconds_ago: float, err: str) -> str:
        # Scaled to 1 ``seconds_ago``: the old task is done, the new one pending.
        service = {"Spec": {"Mode": {"Replicated": {"Replicas": 1}}}, "UpdatedAt": at(seconds_ago)}
        tasks = [task("complete", None, at(60), desired="shutdown"), task("pending", err, at(seconds_ago))]
        return server_info("db1", service, tasks, None, {}, True, port_grace=10).state

    held = "no suitable node (host-mode port already in use on 1 node)"
    # The database's own task of a moment ago still holds the port: Swarm places it once that is done.
    assert state(1, held) == RUNNING
    # Still held past the grace: something else has the port.
    assert state(30, held) == CRASHED
    # Any other error is not waited out.
    assert state(1, "no suitable node (insufficient resources on 1 node)") == CRASHED
