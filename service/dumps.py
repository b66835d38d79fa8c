"""Dumps and restores: pg_dump and pg_restore, run as jobs beside a database's
server, so their versions always match it and nothing is installed here."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .crypto import Vault
from .databases import Databases
from .errors import Conflict, ValidationError
from .models import Database, Status
from .postgres import ServerAdmin, admin_login
from .records import Records
from .runtime import ServerRuntime
from .tenancy import Principal

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class Dumps:
    def __init__(
        self, databases: Databases, records: Records, runtime: ServerRuntime, vault: Vault,
        server_admin: ServerAdmin,
    ) -> None:
        self.databases = databases
        self.records = records
        self.runtime = runtime
        self.vault = vault
        self.server_admin = server_admin

    def dump(self, principal: Principal, database_id: str) -> Iterator[bytes]:
        """A pg_dump custom-format archive, chunk by chunk as the job writes it."""
        record = self._ready(principal, database_id)
        chunks = self.runtime.stream_job(
            record.id,
            ["pg_dump", "--format=custom", *self._connection(record)],
            self._environment(record),
        )
        # The job is started by the first chunk: a refusal (the engine down,
        # the server gone) still becomes an error answer, not a cut stream.
        first = next(chunks, b"")
        return itertools.chain([first], chunks)

    def restore(self, principal: Principal, database_id: str, archive: IO[bytes]) -> Database:
        """Restore ``archive`` into an empty database in one transaction: a bad
        archive changes nothing and is refused with pg_restore's message."""
        record = self._ready(principal, database_id)
        admin = dataclasses.replace(admin_login(record, self.vault), dbname=record.database_name)
        if self.server_admin.user_relations(admin):
            raise Conflict(f"database {database_id} is not empty; restore into a new one")
        with tempfile.TemporaryDirectory(prefix="dbprov-restore-") as directory:
            path = Path(directory) / "archive"
            with open(path, "wb") as spool:
                # To disk, not memory: an archive may be as large as the setting allows.
                shutil.copyfileobj(archive, spool, _CHUNK)
            result = self.runtime.run_job(
                record.id,
                [
                    "pg_restore", "--single-transaction", "--exit-on-error", "--no-owner",
                    # Everything it makes belongs to the tenant's role.
                    f"--role={record.username}", *self._connection(record), "/tmp/input",
                ],
                self._environment(record),
                input_file=path,
            )
            size = path.stat().st_size
        if result.exit_code != 0:
            message = " ".join(line.strip() for line in result.output.splitlines() if line.strip())
            raise ValidationError(
                f"the archive was not restored, and the database is as it was: {message[:1000]}"
            )
        with self.databases.store.transaction() as session:
            self.records.event(session, record, "restored", principal.actor, {"bytes": size})
        log.info("database %s: archive of %d bytes restored", database_id, size)
        return self.databases.get(principal, database_id)

    def _ready(self, principal: Principal, database_id: str) -> Database:
        record = self.databases.get(principal, database_id)
        if record.status != Status.READY:
            raise Conflict(f"database {database_id} is {record.status.value}, not ready")
        return record

    @staticmethod
    def _connection(record: Database) -> list[str]:
        # The job shares the server's network namespace: it is on 127.0.0.1.
        return ["--host=127.0.0.1", f"--username={record.admin_username}", f"--dbname={record.database_name}"]

    def _environment(self, record: Database) -> dict[str, str]:
        return {"PGPASSWORD": self.vault.decrypt(record.admin_password)}
