"""The warm pool: servers kept running per version (DBPROV_POOL_SIZE), so that
a create is a claim instead of a cold start.

Members are records of the reserved tenant ``_pool``: they hold ports and
servers like any database while no tenant sees them. A claim hands one to a
tenant with a fresh role and password; a claimed server never returns.
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import timedelta

import psycopg
from sqlalchemy import bindparam, delete, select

from ..errors import Forbidden, PortRangeExhausted
from ..postgres.admin import ServerAdmin, set_up_tenant
from ..runtime.protocol import ServerRuntime
from ..settings import Settings
from ..store.coordination import Claims
from ..store.crypto import Vault
from ..store.engine import Store
from .images import Images
from .models import (
    DELETING_OR_DELETED,
    SETTLING,
    Database,
    IdempotencyKey,
    Snapshot,
    Status,
    Template,
    TemplateStatus,
    utcnow,
)
from .records import SERVICE, Records
from .registry import Registry, new_password
from .requests import Idempotency, NewDatabase
from .tenancy import POOL_TENANT, Principal

log = logging.getLogger(__name__)

# Members looked at per claim before it falls back to a cold start.
_CANDIDATES = 3
# Seconds a member that replaces a claimed one waits before its server is
# made, while others are ready: the claimed server is being connected to and
# used right now, and a new server's start (the engine's busiest half
# second) would compete with it for the CPU.
_REFILL_DELAY = 1.0


class WarmPool:
    def __init__(
        self, settings: Settings, store: Store, records: Records, vault: Vault, registry: Registry,
        images: Images, server_admin: ServerAdmin, runtime: ServerRuntime, claims: Claims,
    ) -> None:
        self.settings = settings
        self.store = store
        self.records = records
        self.vault = vault
        self._registry = registry
        self._images = images
        self._server_admin = server_admin
        self._runtime = runtime
        self._claims = claims

    def claim(
        self, principal: Principal, new: NewDatabase, idempotency: Idempotency | None
    ) -> Database | None:
        """A warm member made the tenant's: None when the pool is empty or the claim failed.

        A member was stocked with its tenant role and a password of its own
        already made and checked, so a claim that asks for nothing more is one short transaction
        in the metadata store and no round trip to the server: the member's
        password is fresh (no one has seen it) and never handed out twice (a
        claimed server never returns to the pool). A claim that asks for more
        (a superuser role, settings, extensions) sets them up in the server,
        with ``password``, before it answers.
        """
        version = new.version
        if new.template_id is None and not self.settings.pool_sizes.get(version):
            return None
        as_stocked = not (new.superuser or new.parameters or new.extensions)
        started = time.monotonic()
        with self.store.transaction() as session:
            # A template's warm clones count against its tenant already: a
            # claim of one only makes it the tenant's own.
            self._registry.tenants.reserve(
                session, principal.tenant, new.plan, adding=0 if new.template_id else 1,
                admin=principal.admin,
            )
            if new.name is not None:
                self._registry.ensure_name_free(session, principal.tenant, new.name)
            member_id, others = self._pick(session, version, new.template_id)
            if member_id is None:
                return None
            if as_stocked and others:
                # The member that replaces this one is not due before
                # _REFILL_DELAY (see _stock), and a pass now (the engine's
                # listings, the pool's count) would only compete with the
                # client's first connection.
                self.records.wake_later(session, _REFILL_DELAY)
            values = dict(
                tenant=principal.tenant, created_at=utcnow(), **new.columns(),
            )
            if as_stocked:
                values.update(status=Status.READY, ready_at=utcnow(),
                              phase_timings={"claim": round(time.monotonic() - started, 3)})
            else:
                values.update(status=Status.PROVISIONING, password=self.vault.encrypt(new_password()),
                              ready_at=None, phase_timings={})
            member = self.records.transition(
                member_id, {Status.READY}, session=session, actor=principal.actor, event="claimed", **values
            )
            if idempotency is not None:
                self._registry.remember(session, principal.tenant, idempotency, member.id)
        if as_stocked:
            log.info("database %s: warm server claimed for tenant %s", member.id, member.tenant)
            return member
        with self._claims.hold(member.id) as mine:
            if not mine:
                # A reconciler got to it first and finishes it the same way.
                return member
            try:
                set_up_tenant(self._server_admin, member, self.vault)
            except psycopg.Error as exc:
                # Only the class: a server's message might echo a statement.
                log.warning(
                    "database %s: claim failed (%s); starting a cold one", member.id, type(exc).__name__
                )
                if self._release(member):
                    return None
                # A reconciler finished it (or failed it) meanwhile: the create's.
                with self.store.read() as session:
                    return session.get(Database, member.id)
        timings = {"claim": round(time.monotonic() - started, 3)}
        member = self.records.transition(
            member.id, {Status.PROVISIONING}, status=Status.READY, ready_at=utcnow(), phase_timings=timings
        ) or member
        log.info(
            "database %s: warm server claimed for tenant %s (%.3f s)", member.id, member.tenant, timings["claim"]
        )
        return member

    def _pick(self, session, version: str, template_id: str | None) -> tuple[str | None, bool]:
        """The oldest ready member whose server runs (parallel claims each take
        another), and whether more members are ready behind it."""
        query = _members(template_id is not None, self.store.is_postgres)
        candidates = session.scalars(query, {"version": version, "template_id": template_id}).all()
        for place, member_id in enumerate(candidates, start=1):
            # A server that died in the pool is never handed out. What the
            # runtime follows of the engine's events says so without a round
            # trip; else one question to the engine, still cheaper than a
            # connection. The reconciler's drift repair deals with the dead.
            unbroken = self._runtime.runs_unbroken(member_id)
            reason = "stopped or crashed since it was stocked"
            if unbroken is None:
                info = self._runtime.inspect_server(member_id)
                unbroken = info is not None and info.running and not info.restarts
                reason = info.reason if info else "gone"
            if unbroken:
                return member_id, place < len(candidates)
            # Removed, so that the pool is refilled with one that can be trusted.
            self.records.transition(
                member_id, {Status.READY}, session=session, only_if=Database.tenant == POOL_TENANT,
                status=Status.DELETING,
            )
            log.warning("database %s: warm server is %s; not handed out, removed", member_id, reason)
        return None, False

    def _release(self, member: Database) -> bool:
        """A claim that failed: back to the pool's name, to be removed; the
        create's key goes with it, as the create goes on to a cold start.
        False if the member had moved on, and stays the create's."""
        with self.store.transaction() as session:
            released = self.records.transition(
                member.id, {Status.PROVISIONING}, session=session, tenant=POOL_TENANT, name=None,
                status=Status.DELETING,
            )
            if released is not None:
                session.execute(delete(IdempotencyKey).where(IdempotencyKey.database_id == member.id))
        return released is not None

    def stock(self) -> int:
        """Bring each version's pool, and each ready template's, to its size;
        returns how many members were added.

        Workers stocking at the same moment may overshoot; the surplus is
        trimmed on the next pass, so the pool settles at its size.
        """
        with self.store.transaction() as session:
            # Failed members are of no use to anyone, nor are those whose
            # machine is away (they would hold their ports for as long): have
            # them removed; another is stocked where it can run.
            useless = session.scalars(
                select(Database.id).where(
                    Database.tenant == POOL_TENANT, Database.status.in_([Status.FAILED, Status.UNAVAILABLE])
                )
            ).all()
            # Nor are members of a template no longer ready: one stocked as
            # its template was deleted (by another process) outlived the drain.
            useless += session.scalars(
                select(Database.id)
                .join(Template, Template.id == Database.template_id)
                .where(
                    Database.tenant == POOL_TENANT, Database.status.not_in(list(DELETING_OR_DELETED)),
                    Template.status != TemplateStatus.READY,
                )
            ).all()
            self._remove(session, useless)
            templates = session.execute(
                select(Template, Snapshot)
                .join(Snapshot, Snapshot.id == Template.snapshot_id)
                .where(Template.status == TemplateStatus.READY, Template.pool_size > 0)
            ).all()
        added = 0
        try:
            for version, size in self.settings.pool_sizes.items():
                added += self._stock(size, NewDatabase(version))
            for template, snapshot in templates:
                added += self._stock(
                    template.pool_size, NewDatabase(template.version, source=snapshot, template_id=template.id),
                    template.tenant,
                )
        except PortRangeExhausted:
            pass  # tenants come first; the pool waits for free ports
        return added

    def _stock(self, size: int, member: NewDatabase, tenant: str | None = None) -> int:
        """``size`` members like ``member``: the surplus removed, the missing
        recorded. A template's members count against its ``tenant``'s limit:
        never more of them than fit in it."""
        room = self._registry.tenants.room(tenant) if tenant is not None else None
        with self.store.transaction() as session:
            stocked = session.execute(
                select(Database.id, Database.status)
                .where(
                    Database.tenant == POOL_TENANT,
                    Database.version == member.version,
                    _of_template(member.template_id),
                    Database.status.in_(SETTLING | {Status.READY}),
                )
                .order_by(Database.created_at)
            ).all()
            if room is not None:
                # A tenant over its limit (lowered since they were stocked)
                # loses warm clones first: no one has seen their data.
                size = min(size, max(0, len(stocked) + room))
            self._remove(session, [member_id for member_id, _ in stocked[size:]])
        if not self._images.available(member.version):
            return 0  # never stock a version that cannot run
        # An empty pool is refilled at once: the next create would start cold.
        ready = any(status == Status.READY for _, status in stocked)
        not_before = utcnow() + timedelta(seconds=_REFILL_DELAY) if ready else None
        added = 0
        for _ in range(size - len(stocked)):
            try:
                self._registry.add(
                    POOL_TENANT, member, self.vault.encrypt(new_password()), SERVICE, not_before=not_before
                )
            except Forbidden:
                break  # the tenant's creates took the room meanwhile, or its plans changed
            added += 1
        return added

    def _remove(self, session, member_ids) -> None:
        for member_id in member_ids:
            self.records.transition(
                member_id, SETTLING | {Status.READY, Status.FAILED, Status.UNAVAILABLE}, session=session,
                # Not one a create claimed meanwhile.
                only_if=Database.tenant == POOL_TENANT,
                status=Status.DELETING,
            )


def _of_template(template_id):  # noqa: ANN001 - a template's id, its bound parameter, or None
    """Members of a template's pool, or of a version's own pool."""
    return Database.template_id == template_id if template_id is not None else Database.template_id.is_(None)


@functools.cache
def _members(of_template: bool, skip_locked: bool):
    """The oldest ready members of a version's pool (a template's, or the
    version's own): built once, as every claim asks it."""
    query = (
        select(Database.id)
        .where(
            Database.tenant == POOL_TENANT,
            Database.status == Status.READY,
            Database.version == bindparam("version"),
            _of_template(bindparam("template_id") if of_template else None),
        )
        .order_by(Database.created_at)
        .limit(_CANDIDATES)
    )
    # Parallel claims each take another.
    return query.with_for_update(skip_locked=True) if skip_locked else query
