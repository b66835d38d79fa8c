"""Drift: what the runtime runs made to agree with the records again, and the orphans it runs swept away.

A server that stopped or crashed is started; one that vanished is made anew
on its data; a database whose data vanished too is lost. A server whose
machine is away leaves its ready database ``unavailable`` until it is back.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from ..domain.models import MEANT_TO_RUN, OWNS_SERVER, Database, Snapshot, Status, utcnow
from ..errors import DataLost, DbprovError, TransientError
from ..postgres.admin import admin_login
from ..runtime.protocol import ABSENT, RUNNING, UNREACHABLE, ServerInfo
from .provision import Provisioning
from .steps import Context, Step, Task, backoff

log = logging.getLogger(__name__)


class Drift(Step):
    """Drift repair of running databases, and the orphan sweep."""

    def __init__(self, ctx: Context, provisioning: Provisioning) -> None:
        super().__init__(ctx)
        self._provisioning = provisioning

    def check(self, record: Database, info: ServerInfo | None) -> Task | None:
        """Act on a running database whose server is not as it should be, or
        return the step that does, to be run under the database's claim."""
        if info is not None and info.state == UNREACHABLE:
            # Its data is on a machine that is away: nothing is started or
            # made anew (it would start empty) until that machine is back.
            if record.status == Status.READY:
                self._mark_unavailable(record, info.reason)
        elif info is None:
            # Neither its server nor its data: made anew, it would be empty.
            return self._lose_vanished
        elif info.state == ABSENT:
            log.warning("database %s: server vanished; making it anew on its data", record.id)
            if self.records.transition(record.id, MEANT_TO_RUN, status=Status.PROVISIONING):
                return self._provisioning.provision
        elif record.status == Status.UNAVAILABLE:
            return self._recover
        elif info.state != RUNNING:
            # As a task, under the database's claim: a snapshot stops the
            # server on purpose, and holds the claim while it copies.
            return self._repair
        elif record.server_host is None:
            # A record from before the column: ask the runtime once.
            endpoint = self.runtime.endpoint(record.id)
            if endpoint is not None:
                self.records.transition(record.id, {Status.READY}, server_host=endpoint.host)
        return None

    def _lose_vanished(self, database_id: str) -> None:
        """A running database whose server and data both vanished, asked again
        under its claim: a snapshot or a start may have been between them."""
        record = self._load(database_id)
        if record.status in MEANT_TO_RUN and self.runtime.inspect_server(database_id) is None:
            raise DataLost(f"the server and the data of database {database_id} vanished outside dbprov")

    def _mark_unavailable(self, record: Database, reason: str) -> None:
        if self.records.transition(
            record.id, {Status.READY}, status=Status.UNAVAILABLE, last_error=reason,
            event="unavailable", details={"reason": reason},
        ):
            log.warning("database %s: unavailable until its machine is back: %s", record.id, reason)

    def _recover(self, database_id: str) -> None:
        """An unavailable database whose machine is back: its server started if
        need be, then ready again once ``SELECT 1`` works. If it does not come
        up, it stays unavailable with the reason, and a later pass tries again
        after a backoff (a write wakes the loop at once)."""
        record = self._load(database_id)
        info = self.runtime.inspect_server(database_id)
        if record.status != Status.UNAVAILABLE or info is None or info.state in (ABSENT, UNREACHABLE):
            return  # the next pass decides
        try:
            if info.state != RUNNING:
                log.info("database %s: its machine is back, its server %s; starting it", database_id, info.reason)
                self.runtime.start_server(database_id)
            # The machine's address, or its public name, may have changed meanwhile.
            endpoint = self.runtime.endpoint(database_id)
            if endpoint is not None and endpoint.host != record.server_host:
                record = self._transition(database_id, {Status.UNAVAILABLE}, server_host=endpoint.host)
            self._provisioning.wait_ready(record, admin_login(record, self.vault))
        except DbprovError as exc:
            delay = backoff(record.attempts + 1)
            self.records.transition(
                database_id, {Status.UNAVAILABLE}, last_error=exc.detail, attempts=record.attempts + 1,
                next_attempt_at=utcnow() + timedelta(seconds=delay),
            )
            log.warning(
                "database %s: still unavailable: %s; next try in %.1f s",
                database_id, exc.detail.splitlines()[0], delay,
            )
            return
        self._transition(
            database_id, {Status.UNAVAILABLE}, status=Status.READY, last_error=None, active_at=utcnow(),
            attempts=0, next_attempt_at=None, event="available",
        )
        log.info("database %s: available again", database_id)

    def _repair(self, database_id: str) -> None:
        """Start the stopped or crashed server of a ready database."""
        record = self._load(database_id)
        info = self.runtime.inspect_server(database_id)
        if record.status != Status.READY or info is None or info.state in (RUNNING, ABSENT):
            return
        log.warning("database %s: server is %s; starting it", database_id, info.reason)
        try:
            self.runtime.start_server(database_id)
        except DbprovError as exc:
            log.warning("database %s: could not start its server: %s", database_id, exc.detail)

    def sweep_orphans(
        self, records: list[Database], snapshots: list[Snapshot], servers: dict[str, ServerInfo], busy: set[str]
    ) -> None:
        """Remove the servers (and the data) that no record owns; ``busy``: ids a step works on now."""
        owners = set()
        # A failed database that was ready once keeps its data until DELETE;
        # a snapshot's data is stored like a server's, without one.
        data_owners = {s.id for s in snapshots}
        for r in records:
            if r.status in OWNS_SERVER:
                owners.add(r.id)
            elif r.status == Status.FAILED and r.was_ready:
                data_owners.add(r.id)
        data_owners |= owners
        for database_id, info in servers.items():
            if database_id in owners or database_id in busy:
                continue
            keep_data = database_id in data_owners
            # A kept data's machine that is away: nothing of it to remove until it is back.
            if keep_data and info.state in (ABSENT, UNREACHABLE):
                continue
            log.warning(
                "removing orphan %s of database %s", "server" if keep_data else "server and data", database_id
            )
            try:
                self.runtime.remove_server(database_id, keep_data=keep_data)
            except TransientError as exc:
                # One orphan on a machine that is away must not hold up the others.
                log.warning("orphan of database %s left for a later pass: %s", database_id, exc.detail)
