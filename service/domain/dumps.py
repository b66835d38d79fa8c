"""Dumps and restores: pg_dump and pg_restore, run as jobs beside a database's
server, so their versions always match it and nothing is installed here.

Both log in as the tenant, never as the server's superuser: an archive is the
tenant's own SQL (``RESET ROLE`` in it would undo a superuser's ``--role``),
and a dump reads the tenant's database with no more rights than the tenant has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

import psycopg

from ..errors import (
    Conflict,
    DatabaseServerError,
    InsufficientStorage,
    NotFound,
    RateLimited,
    ValidationError,
)
from ..postgres.admin import LOCK_TIMEOUT_MS, Login, ServerAdmin, ServerDatabase, tenant_login
from ..runtime.protocol import ServerRuntime
from ..store.coordination import Slots
from ..store.crypto import Vault
from .models import Database, Status
from .records import Records
from .registry import Registry
from .tenancy import Principal

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# What a restore's spool leaves free on its disk, at the least: the API host's
# temporary folder is shared with everything else that runs there.
_SPOOL_RESERVE = 0.05
# Bytes spooled between looks at the free space of an upload without a length.
_CHECK_EVERY = 64 * _CHUNK


class Dumps:
    def __init__(
        self, registry: Registry, records: Records, runtime: ServerRuntime, vault: Vault,
        server_admin: ServerAdmin, slots: Slots,
    ) -> None:
        self.registry = registry
        self.settings = registry.settings
        self.records = records
        self.runtime = runtime
        self.vault = vault
        self.server_admin = server_admin
        self.slots = slots

    def dump(
        self, principal: Principal, database_id: str, database: str | None = None, globals_only: bool = False
    ) -> Iterator[bytes]:
        """A pg_dump custom-format archive of one database of the server (the
        first, or ``database``), or with ``globals_only`` the server's roles as
        SQL (pg_dumpall's globals, without passwords: the tenant cannot read
        them), chunk by chunk as the job writes it.

        The tenant's transfer slot is held until the stream ends or is closed."""
        record = self._ready(principal, database_id)
        if globals_only:
            command = ["pg_dumpall", "--globals-only", "--no-role-passwords",
                       *self._connection(record, record.database_name)]
        else:
            name = self._existing(record, database)
            # A lock the tenant holds open fails the dump instead of stalling it.
            command = ["pg_dump", "--format=custom", f"--lock-wait-timeout={LOCK_TIMEOUT_MS}",
                       *self._connection(record, name)]
        held = contextlib.ExitStack()
        try:
            self._hold_transfer(held, record)
            chunks = self.runtime.stream_job(record.id, command, self._environment(record))
            # The job is started by the first chunk: a refusal (the engine down,
            # the server gone) still becomes an error answer, not a cut stream.
            first = next(chunks, b"")
        except BaseException:
            held.close()
            raise
        return _Stream(first, chunks, held)

    def restore(
        self, principal: Principal, database_id: str, archive: IO[bytes], length: int | None = None,
        database: str | None = None,
    ) -> Database:
        """Restore ``archive`` (``length`` bytes, when the request said) in one
        transaction into an empty database of the server: the first, or
        ``database``, made for it if the server has none of that name. A bad
        archive changes nothing (a database made for it goes again) and is
        refused with pg_restore's message."""
        record = self._ready(principal, database_id)
        name = record.database_name if database is None else _checked_name(database)
        home = tenant_login(record, self.vault)
        tenant = dataclasses.replace(home, dbname=name)
        with contextlib.ExitStack() as held:
            self._hold_transfer(held, record)
            if not held.enter_context(self.slots.hold("restores", self.settings.restores)):
                raise RateLimited(
                    f"the service runs {self.settings.restores} restores at a time (DBPROV_RESTORES); "
                    "try again shortly", retry_after=10,
                )
            restored = False
            if name not in {d.name for d in self._databases(record)}:
                self._asked(f"make database {name!r} in", record, self.server_admin.create_database, home, name)
                # Made for this archive: gone again unless it is restored.
                held.callback(lambda: restored or self._drop(record, home, name))
            elif self._asked(f"say whether {name!r} is empty in", record, self.server_admin.user_relations, tenant):
                raise Conflict(f"database {name!r} of {database_id} is not empty; restore into a new one")
            directory = held.enter_context(tempfile.TemporaryDirectory(prefix="dbprov-restore-"))
            path = Path(directory) / "archive"
            size = _spool(archive, path, length)
            result = self.runtime.run_job(
                record.id,
                ["pg_restore", "--single-transaction", "--exit-on-error", "--no-owner",
                 *self._connection(record, name), "/tmp/input"],
                self._environment(record),
                input_file=path,
                timeout=self.settings.restore_timeout,
            )
            if result.exit_code != 0:
                message = " ".join(line.strip() for line in result.output.splitlines() if line.strip())
                raise ValidationError(
                    f"the archive was not restored, and the server is as it was: {message[:1000]}"
                )
            restored = True
        with self.registry.store.transaction() as session:
            self.records.event(session, record, "restored", principal.actor, {"bytes": size, "database": name})
        log.info("database %s: archive of %d bytes restored into %s", database_id, size, name)
        return self.registry.get(principal, database_id)

    def contents(self, principal: Principal, database_id: str) -> list[ServerDatabase]:
        """The databases inside the server that the tenant may connect to."""
        return self._databases(self._ready(principal, database_id))

    def _databases(self, record: Database) -> list[ServerDatabase]:
        return self._asked("list the databases of", record, self.server_admin.databases,
                           tenant_login(record, self.vault))

    def _existing(self, record: Database, database: str | None) -> str:
        """``database`` if the server has it (the first database if None), else NotFound."""
        if database is None:
            return record.database_name
        name = _checked_name(database)
        if name not in {d.name for d in self._databases(record)}:
            raise NotFound(f"database {record.id} has no database {name!r} the tenant may connect to")
        return name

    def _drop(self, record: Database, home: Login, name: str) -> None:
        try:
            self.server_admin.drop_database(home, name)
        except psycopg.Error as exc:
            log.warning("database %s: %s, made for a failed restore, stays (%s)", record.id, name, type(exc).__name__)

    @staticmethod
    def _asked(what: str, record: Database, question, *arguments):
        """``question(*arguments)`` of the tenant's server; its failure as the
        domain's, by class only: a server message might echo a statement."""
        try:
            return question(*arguments)
        except psycopg.Error as exc:
            raise DatabaseServerError(
                f"the database server could not {what} database {record.id} ({type(exc).__name__}); "
                "nothing was changed"
            ) from None

    def _hold_transfer(self, held: contextlib.ExitStack, record: Database) -> None:
        """One of the tenant's DBPROV_TENANT_TRANSFERS slots, held by ``held``:
        each dump or restore keeps a job and a connection busy while it runs."""
        limit = self.settings.tenant_transfers
        if not held.enter_context(self.slots.hold(f"transfers-{record.tenant}", limit)):
            raise RateLimited(
                f"tenant {record.tenant!r} already runs {limit} dumps or restores (DBPROV_TENANT_TRANSFERS); "
                "try again when one has ended", retry_after=10,
            )

    def _ready(self, principal: Principal, database_id: str) -> Database:
        record = self.registry.get(principal, database_id)
        if record.status == Status.SLEEPING:
            # A dump runs beside the server, not through its port: nothing wakes it on the way.
            raise Conflict(f"database {database_id} is sleeping; POST /databases/{database_id}/start "
                           "(or any connection) wakes it, then ask again")
        if record.status != Status.READY:
            raise Conflict(f"database {database_id} is {record.status.value}, not ready")
        return record

    @staticmethod
    def _connection(record: Database, database: str) -> list[str]:
        # The job shares the server's network namespace: it is on 127.0.0.1.
        return ["--host=127.0.0.1", f"--username={record.username}", f"--dbname={database}"]

    def _environment(self, record: Database) -> dict[str, str]:
        return {"PGPASSWORD": self.vault.decrypt(record.password)}


class _Stream:
    """A dump's chunks, and what it holds until they end or the answer is
    closed: a WSGI server closes an answer whose client went away, which a
    plain generator that never started would not pass on."""

    def __init__(self, first: bytes, chunks: Iterator[bytes], held: contextlib.ExitStack) -> None:
        self._first: bytes | None = first
        self._chunks = chunks
        self._held = held

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._held.close()


# A database the tenant names: what PostgreSQL takes unquoted and more, never
# the templates, which are the server's.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_$.-]{0,62}")


def _checked_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in ("template0", "template1"):
        raise ValidationError(
            f"invalid database name {name!r}: 1 to 63 letters, digits, '_', '$', '.' or '-', "
            "not a template",
            errors={"query": {"database": ["Not a database name the tenant may use."]}},
        )
    return name


def _spool(archive: IO[bytes], path: Path, length: int | None) -> int:
    """``archive`` written to ``path``, once: an archive may be as large as
    DBPROV_RESTORE_MAX_BYTES, too large for memory. Refused before a byte is
    written when its declared length would not fit above the disk's reserve,
    and stopped when the disk comes down to the reserve as it is written."""
    usage = shutil.disk_usage(path.parent)
    reserve = int(usage.total * _SPOOL_RESERVE)
    room = usage.free - reserve
    if length is not None and length > room:
        raise InsufficientStorage(
            f"an archive of {length} bytes does not fit on the service's disk now "
            f"({max(room, 0)} bytes to spare); nothing was restored"
        )
    written = unchecked = 0
    with open(path, "wb") as spool:
        while chunk := archive.read(_CHUNK):
            spool.write(chunk)
            written += len(chunk)
            unchecked += len(chunk)
            if unchecked >= _CHECK_EVERY:
                unchecked = 0
                if shutil.disk_usage(path.parent).free < reserve:
                    raise InsufficientStorage(
                    f"the service's disk filled up after {written} bytes of the archive; nothing was restored"
                )
    return written
