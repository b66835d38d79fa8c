"""Where a database's data lives on a Swarm: its nodes, the record of the node that holds
its data (a Swarm config per database), and the choice of a node for new data."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import docker
import docker.errors

from ..errors import EngineError, NodeUnavailable, TransientError
from .engine import LABEL_JOB
from .protocol import LABEL_INSTANCE, labels_for

# On a placement config: the node holding the data, and the server's image
# (for jobs on the data while no service exists, a snapshot's say).
LABEL_NODE = "io.dbprov.node"
LABEL_IMAGE = "io.dbprov.image"


def placement_name(database_id: str) -> str:
    return f"dbprov-{database_id}-placement"


@dataclass(frozen=True)
class Node:
    """A Swarm node as placement sees it."""

    id: str
    hostname: str
    address: str
    # "ready", "down", "unknown" or "disconnected".
    state: str
    # "active", "pause" or "drain".
    availability: str
    memory: int
    labels: dict

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class Placement:
    """The nodes of one installation's Swarm, through its manager's engine."""

    def __init__(
        self,
        engine,
        instance: str,
        exclude_label: str,
        host_label: str,
        overcommit: float,
        max_per_node: int | None,
    ) -> None:
        self.engine = engine
        self.instance = instance
        self.exclude_label = exclude_label
        self.host_label = host_label
        self.overcommit = overcommit
        self.max_per_node = max_per_node
        self._local_node: str | None = None

    @property
    def client(self) -> "docker.DockerClient":
        return self.engine.client

    def nodes(self) -> dict[str, Node]:
        return {n["ID"]: _node(n) for n in self.client.api.nodes()}

    def local_node_id(self) -> str:
        if self._local_node is None:
            self._local_node = (self.client.info().get("Swarm") or {}).get("NodeID") or ""
        return self._local_node

    def marker(self, database_id: str) -> dict | None:
        try:
            return self.client.api.inspect_config(placement_name(database_id))
        except docker.errors.NotFound:
            return None

    def choose(self, memory: int) -> Node:
        """The node with the fewest databases among those with room for ``memory``.

        A node's databases are the services placed on it, stopped ones too:
        each may start again at any time, and only there.
        """
        nodes = self.nodes()
        counts: dict[str, int] = {}
        promised: dict[str, int] = {}
        for service in self.client.api.services(filters={"label": [f"{LABEL_INSTANCE}={self.instance}"]}):
            node_id = constrained_node(service)
            if node_id is None or LABEL_JOB in (service["Spec"].get("Labels") or {}):
                continue
            limits = (service["Spec"]["TaskTemplate"].get("Resources") or {}).get("Limits") or {}
            counts[node_id] = counts.get(node_id, 0) + 1
            promised[node_id] = promised.get(node_id, 0) + int(limits.get("MemoryBytes") or 0)
        candidates = []
        refusals = []
        for node in nodes.values():
            free = int(node.memory * self.overcommit) - promised.get(node.id, 0)
            if not node.ready or node.availability != "active":
                refusals.append(f"{node.hostname}: {node.state}, {node.availability}")
            elif _flag(node.labels.get(self.exclude_label)):
                refusals.append(f"{node.hostname}: labelled {self.exclude_label}")
            elif self.max_per_node is not None and counts.get(node.id, 0) >= self.max_per_node:
                refusals.append(f"{node.hostname}: {counts[node.id]} databases (DBPROV_SWARM_MAX_PER_NODE)")
            elif memory and free < memory:
                refusals.append(
                    f"{node.hostname}: {free // 2**20} MiB free of the {memory // 2**20} MiB asked"
                )
            else:
                candidates.append((counts.get(node.id, 0), -free, node.id, node))
        if not candidates:
            # Transient: a database deleted or a node added makes room.
            raise TransientError(f"no Swarm node can take the database ({'; '.join(refusals) or 'no nodes'})")
        return min(candidates)[3]

    def record(self, database_id: str, node_id: str, image: str) -> str:
        """Record ``node_id`` as the home of the data unless one is recorded; returns the recorded one."""
        labels = {**labels_for(self.instance, database_id), LABEL_NODE: node_id, LABEL_IMAGE: image}
        try:
            self.client.api.create_config(
                placement_name(database_id), json.dumps({"node": node_id}).encode(), labels=labels
            )
            return node_id
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        # Another process recorded it first: theirs stands.
        marker = self.marker(database_id)
        if marker is None:
            raise EngineError(f"the placement of database {database_id} changed while it was recorded")
        return marker_node(marker)

    def require_up(self, node_id: str | None, database_id: str) -> Node:
        node = self.nodes().get(node_id or "")
        if node is None or not node.ready:
            raise NodeUnavailable(
                f"{node_text(node, node_id)}: database {database_id}'s data is on it, so its server "
                "waits for that node"
            )
        return node

    def host(self, node: Node) -> str:
        return node.labels.get(self.host_label) or node.address


def _node(attrs: dict) -> Node:
    status = attrs.get("Status") or {}
    address = status.get("Addr") or ""
    if address in ("", "0.0.0.0"):
        # A manager may report no address of its own; its manager address has it.
        manager = (attrs.get("ManagerStatus") or {}).get("Addr") or ""
        address = manager.rsplit(":", 1)[0] or address
    spec = attrs.get("Spec") or {}
    description = attrs.get("Description") or {}
    return Node(
        id=attrs["ID"],
        hostname=description.get("Hostname") or attrs["ID"],
        address=address,
        state=status.get("State", "unknown"),
        availability=spec.get("Availability", "active"),
        memory=int(((description.get("Resources") or {}).get("MemoryBytes")) or 0),
        labels=spec.get("Labels") or {},
    )


def node_text(node: Node | None, node_id: str | None) -> str:
    if node is None:
        return f"node {node_id} has left the swarm"
    # The id too: `docker node rm` takes it, and host names may repeat.
    return f"node {node.hostname} ({node.id}) is {node.state}"


def marker_labels(marker: dict | None) -> dict:
    return ((marker or {}).get("Spec") or {}).get("Labels") or {}


def marker_node(marker: dict) -> str:
    return marker_labels(marker)[LABEL_NODE]


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("false", "0", "no", "off")


def constrained_node(service: dict | None) -> str | None:
    if service is None:
        return None
    constraints = ((service["Spec"]["TaskTemplate"].get("Placement") or {}).get("Constraints")) or []
    for constraint in constraints:
        match = re.fullmatch(r"\s*node\.id\s*==\s*(\S+)\s*", constraint)
        if match:
            return match[1]
    return None
