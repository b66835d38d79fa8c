"""The warm pool: servers kept running per version (DBPROV_POOL_SIZE), so that
a create is a claim instead of a cold start.

Members are records of the reserved tenant ``_pool``: they hold ports and
servers like any database while no tenant sees them. A claim hands one to a
tenant with a fresh role and password; a claimed server never returns.
"""

from __future__ import annotations

import logging
import time

import psycopg
from sqlalchemy import delete, select

from .coordination import Claims
from .databases import Databases, Idempotency, Wanted, new_password
from .errors import PortRangeExhausted
from .models import SETTLING, Database, IdempotencyKey, Snapshot, Status, Template, TemplateStatus, utcnow
from .postgres import set_up_tenant
from .records import SERVICE
from .tenancy import POOL_TENANT, Principal

log = logging.getLogger(__name__)


class WarmPool:
    def __init__(self, databases: Databases, claims: Claims) -> None:
        # A claim and a stocking are creates of a kind: the same settings,
        # store, records, vault and server admin as the use cases'.
        self._databases = databases
        self.settings = databases.settings
        self.store = databases.store
        self.records = databases.records
        self.vault = databases.vault
        self._server_admin = databases.server_admin
        self._claims = claims

    def claim(
        self, principal: Principal, wanted: Wanted, password: str, idempotency: Idempotency | None
    ) -> Database | None:
        """A warm member made the tenant's: None when the pool is empty or the claim failed."""
        version = wanted.version
        if wanted.template_id is None and not self.settings.pool_sizes.get(version):
            return None
        started = time.monotonic()
        with self.store.transaction() as session:
            self._databases.tenants.reserve(session, principal.tenant)
            if wanted.name is not None:
                self._databases.ensure_name_free(session, principal.tenant, wanted.name)
            query = (
                select(Database.id)
                .where(
                    Database.tenant == POOL_TENANT,
                    Database.status == Status.READY,
                    Database.version == version,
                    _of_template(wanted.template_id),
                )
                .order_by(Database.created_at)
                .limit(1)
            )
            if self.store.is_postgres:
                # Parallel claims each take a different member instead of queueing.
                query = query.with_for_update(skip_locked=True)
            member_id = session.scalar(query)
            if member_id is None:
                return None
            member = self.records.transition(
                member_id,
                {Status.READY},
                session=session,
                actor=principal.actor,
                event="claimed",
                tenant=principal.tenant,
                password=password,
                status=Status.PROVISIONING,
                created_at=utcnow(),
                ready_at=None,
                phase_timings={},
                **wanted.columns(),
            )
            if idempotency is not None:
                self._databases.remember(session, principal.tenant, idempotency, member.id)
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
                self._release(member)
                return None
        timings = {"claim": round(time.monotonic() - started, 3)}
        member = self.records.transition(
            member.id, {Status.PROVISIONING}, status=Status.READY, ready_at=utcnow(), phase_timings=timings
        ) or member
        log.info(
            "database %s: warm server claimed for tenant %s (%.3f s)", member.id, member.tenant, timings["claim"]
        )
        return member

    def _release(self, member: Database) -> None:
        """A claim that failed: back to the pool's name, to be removed; the
        create's key goes with it, as the create goes on to a cold start."""
        with self.store.transaction() as session:
            self.records.transition(
                member.id, {Status.PROVISIONING}, session=session, tenant=POOL_TENANT, name=None,
                status=Status.DELETING,
            )
            session.execute(delete(IdempotencyKey).where(IdempotencyKey.database_id == member.id))

    def stock(self) -> int:
        """Bring each version's pool, and each ready template's, to its size;
        returns how many members were added.

        Workers stocking at the same moment may overshoot; the surplus is
        trimmed on the next pass, so the pool settles at its size.
        """
        with self.store.transaction() as session:
            # Failed members are of no use to anyone: have them removed.
            failed = session.scalars(
                select(Database.id).where(Database.tenant == POOL_TENANT, Database.status == Status.FAILED)
            ).all()
            self._remove(session, failed)
            templates = session.execute(
                select(Template, Snapshot)
                .join(Snapshot, Snapshot.id == Template.snapshot_id)
                .where(Template.status == TemplateStatus.READY, Template.pool_size > 0)
            ).all()
        added = 0
        try:
            for version, size in self.settings.pool_sizes.items():
                added += self._keep(size, Wanted(version))
            for template, snapshot in templates:
                added += self._keep(
                    template.pool_size, Wanted(template.version, source=snapshot, template_id=template.id)
                )
        except PortRangeExhausted:
            pass  # tenants come first; the pool waits for free ports
        return added

    def _keep(self, size: int, member: Wanted) -> int:
        """``size`` members like ``member``: the surplus removed, the missing recorded."""
        with self.store.transaction() as session:
            stocked = list(
                session.scalars(
                    select(Database.id)
                    .where(
                        Database.tenant == POOL_TENANT,
                        Database.version == member.version,
                        _of_template(member.template_id),
                        Database.status.in_(SETTLING | {Status.READY}),
                    )
                    .order_by(Database.created_at)
                )
            )
            self._remove(session, stocked[size:])
        if not self._databases.images.available(member.version):
            return 0  # never stock a version that cannot run
        for _ in range(size - len(stocked)):
            self._databases.record(POOL_TENANT, member, self.vault.encrypt(new_password()), SERVICE)
        return max(0, size - len(stocked))

    def _remove(self, session, member_ids) -> None:
        for member_id in member_ids:
            self.records.transition(
                member_id, SETTLING | {Status.READY, Status.FAILED}, session=session,
                # Not one a create claimed meanwhile.
                only_if=Database.tenant == POOL_TENANT,
                status=Status.DELETING,
            )


def _of_template(template_id: str | None):
    """Members of a template's pool, or of the plain pool."""
    return Database.template_id == template_id if template_id else Database.template_id.is_(None)
