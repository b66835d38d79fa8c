"""Swarm's services, tasks and networks as the Swarm runtime makes and reads them: one
database's server, its one-off jobs, and its overlay network, and a server's state from them."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone

import docker
import docker.errors

from ..errors import EngineError, ImageMissing, JobTimedOut, PortInUse
from ..settings import size_in_bytes
from .engine import LABEL_JOB, when
from .entry import carries_tls, tls_entry
from .protocol import (
    ABSENT,
    CRASHED,
    LABEL_DATABASE_ID,
    PGDATA,
    RUNNING,
    STOPPED,
    UNREACHABLE,
    JobResult,
    ServerInfo,
    ServerSpec,
    container_name,
    labels_for,
    volume_name,
)
from .swarm_placement import Node, node_text

log = logging.getLogger(__name__)

# A host port taken on the node: by a program (the kernel's bind()) or by
# another Swarm task (the scheduler's words, on a task left pending).
_PORT_TAKEN = ("address already in use", "port is already allocated", "host-mode port already in use")
_NO_IMAGE = ("no such image", "pull access denied", "manifest unknown", "repository does not exist")
_NANO = 1_000_000_000
# Set by Swarm on every task container.
_SERVICE_LABEL = "com.docker.swarm.service.name"

# A task's states before it runs, and those of a task that failed.
_BEFORE_RUNNING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
FAILED = {"failed", "rejected"}
DONE = {"complete", "shutdown", "failed", "rejected", "orphaned", "remove"}


def network_name(database_id: str) -> str:
    return f"dbprov-{database_id}-net"


class Services:
    """One installation's services and networks, through the Swarm manager's engine."""

    def __init__(self, engine, instance: str, start_timeout: float, port_grace: float) -> None:
        self.engine = engine
        self.instance = instance
        # How long a server's task is waited for to run.
        self.start_timeout = start_timeout
        # How long a taken port is waited for before the database moves to another.
        self.port_grace = port_grace
        # Whether the engine keeps NoNewPrivileges in a service's spec (API 1.46
        # and later); None until the first service says.
        self.no_new_privileges: bool | None = None
        self._warned = threading.Event()

    @property
    def client(self) -> "docker.DockerClient":
        return self.engine.client

    # -- a database's server ----------------------------------------------------------

    def create(self, spec: ServerSpec, node: Node, host: str, network: str) -> None:
        """The server's service, on ``node`` (known to clients as ``host``) and ``network``."""
        labels = labels_for(self.instance, spec.database_id)
        limits: dict = {"Pids": spec.pids_limit or 0}
        if spec.memory_limit:
            limits["MemoryBytes"] = size_in_bytes(spec.memory_limit)
        if spec.cpus:
            limits["NanoCPUs"] = int(spec.cpus * _NANO)
        container_spec: dict = {
            # Args, not Command: the image's entrypoint stays (with TLS, behind an entry of its own).
            "Args": list(spec.command),
            "Mounts": [volume_mount(spec.database_id, PGDATA, labels)],
        }
        environment = spec.environment
        if spec.tls is not None:
            # No file can be put into a service's container before it starts:
            # the certificate and key come in its environment, and its entry
            # writes them, as the Docker runtime's does. Its name for clients
            # is the node's host, known only now.
            container_spec["Command"], container_spec["Args"], environment = tls_entry(
                spec.tls((host,)), self._entrypoint(spec.image), container_spec["Args"], environment
            )
        task_template = {
            "ContainerSpec": {
                **container_spec,
                "Image": spec.image,
                "Env": [f"{k}={v}" for k, v in environment.items()],
                "Labels": labels,
                # A fast shutdown, whatever the image says; after 30 s the engine kills.
                "StopSignal": "SIGINT",
                "StopGracePeriod": 30 * _NANO,
                # Kept by engines with API 1.46 and later; older ones drop it
                # (checked below, and said once in the log).
                "Privileges": {"NoNewPrivileges": True},
            },
            "Resources": {"Limits": limits},
            # Swarm replaces a task that exits, whatever its exit code: like
            # the Docker runtime's unless-stopped, a stop is a scale to 0.
            "RestartPolicy": {"Condition": "any", "Delay": _NANO, "MaxAttempts": 0},
            "Placement": {"Constraints": [f"node.id=={node.id}"]},
            "Networks": [{"Target": network}],
        }
        endpoint_spec = {
            # No virtual IP: clients come through the published port only.
            "Mode": "dnsrr",
            "Ports": [{
                "Protocol": "tcp", "TargetPort": 5432, "PublishedPort": spec.port, "PublishMode": "host",
            }],
        }
        try:
            created = self.client.api.create_service(
                task_template, name=container_name(spec.database_id), labels=labels,
                mode={"Replicated": {"Replicas": 1}}, endpoint_spec=endpoint_spec,
                # Never two servers on one data directory, even for a moment.
                update_config={"Parallelism": 1, "Order": "stop-first"},
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            return  # made by a concurrent ensure
        self._check_privileges(created["ID"])

    def _entrypoint(self, image: str) -> list[str]:
        """The image's entrypoint as the manager's engine has it: a service's
        Command replaces it, so one that wraps it must name it."""
        found = self.engine.image(image)
        if found is None and self.engine.pull:
            self.engine.pull_image(image)
            found = self.engine.image(image)
        if found is None:
            raise ImageMissing(
                f"the manager's engine has no image {image} and pulling is off (DBPROV_PULL_IMAGES)", image=image
            )
        return list(found["Config"].get("Entrypoint") or [])

    def _check_privileges(self, service_id: str) -> None:
        if self.no_new_privileges is not None:
            return
        spec = self.client.api.inspect_service(service_id)["Spec"]["TaskTemplate"]["ContainerSpec"]
        self.no_new_privileges = bool((spec.get("Privileges") or {}).get("NoNewPrivileges"))
        if not self.no_new_privileges and not self._warned.is_set():
            self._warned.set()
            log.warning(
                "this Swarm's engine (API %s) drops NoNewPrivileges from service specs (API 1.46 "
                "adds it): tenant servers run without no-new-privileges unless every node's daemon "
                "sets it (\"no-new-privileges\": true in daemon.json)",
                self.client.api.api_version,
            )

    def await_running(self, spec: ServerSpec, node: Node) -> dict:
        """Wait until the server's task runs, and return its service; a port
        taken for good or a missing image ends it."""
        name = container_name(spec.database_id)
        started = time.monotonic()
        while True:
            service = self.service(name)
            if service is None:
                raise EngineError(f"the service of database {spec.database_id} vanished while starting")
            since = when(service.get("UpdatedAt") or service.get("CreatedAt"))
            tasks = self.tasks(name)
            current = [t for t in tasks if t.get("DesiredState") == "running"]
            if any(t["Status"]["State"] == "running" for t in current):
                return service
            recent = [t for t in tasks if when(t.get("CreatedAt")) >= since]
            for task in recent:
                error = (task["Status"].get("Err") or "").lower()
                # The port may be held for a moment by this database's own task
                # of before (its service removed behind dbprov's back, on a node
                # this engine cannot look into): Swarm tries again meanwhile.
                if any(p in error for p in _PORT_TAKEN) and time.monotonic() - started > self.port_grace:
                    # Leave nothing but the data behind: another port is tried next.
                    self.client.api.remove_service(service["ID"])
                    raise PortInUse(f"port {spec.port} on node {node.hostname}: {task['Status']['Err']}")
                if task["Status"]["State"] in FAILED and any(p in error for p in _NO_IMAGE):
                    self.client.api.remove_service(service["ID"])
                    raise ImageMissing(
                        f"node {node.hostname} has no image {spec.image} and cannot pull it: "
                        f"{task['Status']['Err']}", image=spec.image,
                    )
            if any(crashed(t) for t in recent):
                # It ran and crashed: the reconciler reads the restarts and the log.
                return service
            if time.monotonic() - started > self.start_timeout:
                states = ", ".join(
                    f"{t['Status']['State']}{': ' + t['Status']['Err'] if t['Status'].get('Err') else ''}"
                    for t in current
                ) or "no task"
                raise EngineError(
                    f"the server of {spec.database_id} is not running on node {node.hostname} "
                    f"after {self.start_timeout:g} s ({states})"
                )
            time.sleep(0.1)

    def await_predecessor(self, name: str, local: bool) -> None:
        """Wait for the containers of a service of this name that is gone to leave this node.

        A service removed behind dbprov's back stops its task a few seconds
        later, and until then holds the port and the volume its successor needs.
        """
        if not local:
            return  # Swarm's own retries cover other nodes
        deadline = time.monotonic() + 30
        while self.task_containers(name):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)

    # -- services, tasks, networks and jobs ---------------------------------------------

    def service(self, name: str) -> dict | None:
        try:
            return self.client.api.inspect_service(name)
        except docker.errors.NotFound:
            return None

    def tasks(self, name: str) -> list[dict]:
        try:
            return self.client.api.tasks(filters={"service": name})
        except docker.errors.NotFound:
            # Removed since it was looked up (by a sweep, a delete): no task is left.
            return []

    def task_containers(self, name: str, running: bool = False) -> list[dict]:
        """The containers of service ``name`` on the manager's own node."""
        filters: dict = {"label": [f"{_SERVICE_LABEL}={name}"]}
        if running:
            filters["status"] = "running"
        return self.client.api.containers(all=not running, filters=filters)

    def scale(self, service: dict, replicas: int) -> None:
        self.client.api.update_service(
            service["ID"], version=service["Version"]["Index"],
            mode={"Replicated": {"Replicas": replicas}}, fetch_current_spec=True,
        )

    def labels_of(self, database_id: str) -> dict[str, str]:
        return labels_for(self.instance, database_id)

    def ensure_network(self, database_id: str) -> str:
        """The database's own overlay network."""
        name = network_name(database_id)
        found = self.network(name)
        if found is not None:
            return found
        try:
            # Attachable: a job container on the manager can join it.
            return self.client.api.create_network(
                name, driver="overlay", attachable=True, labels=self.labels_of(database_id),
                check_duplicate=True,
            )["Id"]
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        found = self.network(name)
        if found is None:
            raise EngineError(f"network {name} vanished while it was made")
        return found

    def replace_network(self, database_id: str, stale: str) -> str:
        """A network for one removed behind dbprov's back that a node still lists.

        The node lists it until its last container has left it, and no other
        of that name can be made until then.
        """
        deadline = time.monotonic() + 30
        while self.network(network_name(database_id)) == stale and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.ensure_network(database_id)

    def network(self, name: str) -> str | None:
        try:
            return self.client.api.inspect_network(name, scope="swarm")["Id"]
        except docker.errors.NotFound:
            return None

    def remove_network(self, database_id: str) -> None:
        name = network_name(database_id)
        deadline = time.monotonic() + 30
        while True:
            network = self.network(name)
            if network is None:
                return
            try:
                self.client.api.remove_network(network)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError:
                # Still used by a task on its way out.
                if time.monotonic() > deadline:
                    raise
            # A node still lists a removed overlay until its last container
            # has left it, and a service made on that id would be refused.
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def job_service(
        self,
        database_id: str,
        node_id: str,
        image: str,
        command: list[str],
        mounts: list[dict],
        environment: dict[str, str] | None = None,
        network: str | None = None,
        timeout: float = 300.0,
    ) -> JobResult:
        """Run ``command`` once as a one-off service on ``node_id``; its output and exit code."""
        name = f"{container_name(database_id)}-job-{secrets.token_hex(3)}"
        task_template: dict = {
            "ContainerSpec": {
                "Image": image,
                "Command": command[:1],
                "Args": command[1:],
                "Env": [f"{k}={v}" for k, v in (environment or {}).items()],
                "Labels": {**self.labels_of(database_id), LABEL_JOB: "true"},
                "Mounts": mounts,
                "Privileges": {"NoNewPrivileges": True},
            },
            "RestartPolicy": {"Condition": "none"},
            "Placement": {"Constraints": [f"node.id=={node_id}"]},
        }
        if network:
            task_template["Networks"] = [{"Target": network}]
        service = self.client.api.create_service(
            task_template, name=name, labels={**self.labels_of(database_id), LABEL_JOB: "true"},
            # Not a replicated-job: Swarm (20.10) leaves the containers of a
            # finished job behind when its service goes, holding its volumes.
            mode={"Replicated": {"Replicas": 1}},
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                tasks = self.tasks(name)
                done = [t for t in tasks if t["Status"]["State"] in DONE]
                if done:
                    task = done[0]
                    break
                if time.monotonic() > deadline:
                    raise JobTimedOut(f"{command[0]} ran longer than {timeout:g} s and was stopped")
                time.sleep(0.1)
            status = task["Status"]
            if status["State"] == "rejected":
                raise EngineError(f"job {command[0]} could not start: {status.get('Err')}")
            exit_code = (status.get("ContainerStatus") or {}).get("ExitCode")
            if exit_code is None:
                exit_code = 0 if status["State"] == "complete" else -1
            chunks = self.client.api.service_logs(service["ID"], stdout=True, stderr=True)
            raw = b"".join(chunks) if not isinstance(chunks, (bytes, str)) else chunks
            output = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
            return JobResult(exit_code=exit_code, output=output)
        finally:
            try:
                self.client.api.remove_service(service["ID"])
            except docker.errors.NotFound:
                pass

    def remove_jobs(self, database_id: str) -> None:
        selector = {"label": [f"{LABEL_DATABASE_ID}={database_id}", LABEL_JOB]}
        for job in self.client.api.services(filters=selector):
            try:
                self.client.api.remove_service(job["ID"])
            except docker.errors.NotFound:
                pass
        for job in self.client.api.containers(all=True, filters=selector):
            self.engine.remove_container(job["Id"])


def server_info(
    database_id: str,
    service: dict | None,
    tasks: list[dict],
    node_id: str | None,
    nodes: dict[str, Node],
    has_data: bool,
    port_grace: float,
) -> ServerInfo | None:
    """Swarm's view of a database as a server state.

    A task held back for ``port_grace`` seconds after a start because its
    port is taken is still starting: the port's holder is the database's own
    task of before, stopped a moment ago (by the engine at hand, faster than
    Swarm's agent reports it). Swarm places the task once it is reported done.
    """
    node = nodes.get(node_id or "")
    if node_id and (node is None or not node.ready):
        # Not ABSENT even without a service: the data is on that node, and a
        # server made anew elsewhere would start empty.
        return ServerInfo(database_id, UNREACHABLE, has_data, node_text(node, node_id))
    if service is None:
        return ServerInfo(database_id, ABSENT, True, "no service") if has_data else None
    if replicas(service) == 0:
        return ServerInfo(database_id, STOPPED, has_data, "scaled to 0 replicas")
    since = when(service.get("UpdatedAt") or service.get("CreatedAt"))
    failures = [t for t in tasks if crashed(t) and when(t.get("CreatedAt")) >= since]
    restarts = len(failures)
    current = max(
        (t for t in tasks if t.get("DesiredState") == "running"),
        key=lambda t: when(t.get("CreatedAt")), default=None,
    )
    where = f" on {node.hostname}" if node else ""
    after = f" after {restarts} restart(s)" if restarts else ""
    last = f"; last failure: {failures[-1]['Status'].get('Err')}" if failures else ""
    if current is None:
        if not failures:
            # Scaled up a moment ago: the orchestrator is making its task.
            return ServerInfo(database_id, RUNNING, has_data, f"starting{where}", restarts)
        return ServerInfo(database_id, CRASHED, has_data, f"no task{where}{after}{last}", restarts)
    state = current["Status"]["State"]
    error = current["Status"].get("Err")
    if state == "running":
        return ServerInfo(database_id, RUNNING, has_data, f"running{where}{after}", restarts)
    held_back = error and any(p in error.lower() for p in _PORT_TAKEN) and (
        datetime.now(timezone.utc) - since < timedelta(seconds=port_grace))
    if state in _BEFORE_RUNNING and (not error or held_back) and not failures:
        return ServerInfo(database_id, RUNNING, has_data, f"{state}{where}", restarts)
    detail = f": {error}" if error else ""
    return ServerInfo(database_id, CRASHED, has_data, f"{state}{detail}{where}{after}{last}", restarts)


def crashed(task: dict) -> bool:
    """Whether a task ran and failed (rather than never started: a port, an image)."""
    status = task["Status"]
    return status["State"] in FAILED and "non-zero exit" in (status.get("Err") or "")


def serves_tls(service: dict) -> bool:
    """Whether a server's service was made with a certificate."""
    return carries_tls(service["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env"))


def replicas(service: dict) -> int:
    return int(((service["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas", 0))


def database_id_of(labels: dict | None) -> str | None:
    return (labels or {}).get(LABEL_DATABASE_ID)


def volume_mount(database_id: str, target: str, labels: dict, read_only: bool = False) -> dict:
    # The node makes the volume, labelled, when the task starts there.
    return {
        "Type": "volume", "Source": volume_name(database_id), "Target": target,
        "ReadOnly": read_only, "VolumeOptions": {"Labels": labels},
    }
