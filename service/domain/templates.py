"""Templates keyed by a hash of a client's migrations and fixtures.

The first client to ask for a key gets a database to fill (like a create); it
finalizes the template, which takes a snapshot of that database and drops the
database. Every later create that names the key gets a clone of the snapshot,
from the template's own warm pool when it has one. While a template is being
built, others asking for the same key get 423 and ask again.
"""

from __future__ import annotations

import logging
import re
import secrets
from datetime import timedelta

import sqlalchemy.exc
from sqlalchemy import select, true
from sqlalchemy.orm import Session

from ..errors import Conflict, Locked, NotFound, ValidationError
from ..settings import Settings
from ..store.engine import Store
from .images import Images
from .models import DELETING_OR_DELETED, Database, Status, Template, TemplateStatus, utcnow
from .records import SERVICE, Records
from .registry import Registry, new_password
from .requests import NewDatabase
from .snapshots import Snapshots
from .tenancy import POOL_TENANT, Principal

log = logging.getLogger(__name__)

KEY_PATTERN = r"[A-Za-z0-9._:-]{1,255}"
# Warm clones a template may keep.
MAX_POOL = 20
# A new template gets its database a moment after it is recorded; one still
# without it after this was begun by a process that ended in between.
_UNFILLED_GRACE = timedelta(minutes=1)


class Templates:
    def __init__(
        self, settings: Settings, store: Store, records: Records, registry: Registry, images: Images,
        snapshots: Snapshots,
    ) -> None:
        self.settings = settings
        self.store = store
        self.records = records
        self.registry = registry
        self.images = images
        self.snapshots = snapshots

    def begin(self, principal: Principal, key: str, version: str | None) -> tuple[Template, Database | None]:
        """The template for ``key``: a new one with its database to fill, or the
        ready one (and no database). ``Locked`` while another client builds it."""
        _check_key(key)
        version = version or self.settings.default_version
        existing = self._live(principal.tenant, key)
        if existing is not None and (existing.status == TemplateStatus.FAILED or self._abandoned(existing)):
            # Nobody will ever find it ready: the key gets a fresh build to fill.
            self._drop(existing.id, {existing.status}, SERVICE)
            log.warning("template %s (%s): its build failed or was abandoned; the key is free again",
                        existing.id, key)
            existing = self._live(principal.tenant, key)
        if existing is not None:
            return self._unless_building(existing), None
        if version not in self.settings.images:
            raise ValidationError(
                f"unsupported version {version!r}",
                errors={"json": {"version": [f"Must be one of: {', '.join(self.settings.images)}."]}},
            )
        self.images.require(version)
        template = Template(
            id=secrets.token_hex(6), tenant=principal.tenant, key=key, version=version,
            status=TemplateStatus.BUILDING, pool_size=0, created_at=utcnow(),
        )
        try:
            with self.store.transaction() as session:
                self.registry.tenants.reserve_template(session, principal.tenant)
                self.records.insert(session, template)
        except sqlalchemy.exc.IntegrityError:
            # Another client asked for the same key at the same moment and won.
            return self._unless_building(self._live(principal.tenant, key)), None
        try:
            database = self.registry.add(
                principal.tenant, NewDatabase(version, template_id=template.id),
                self.registry.vault.encrypt(new_password()), principal.actor, admin=principal.admin,
            )
        except Exception:
            # Nothing to fill: free the key for the next client.
            self._set(template.id, {TemplateStatus.BUILDING}, status=TemplateStatus.DELETED)
            raise
        template = self._set(template.id, {TemplateStatus.BUILDING}, database_id=database.id)
        if template is None:
            # Deleted meanwhile, its database with it (``_drop``).
            raise Conflict(f"template {key!r} was deleted meanwhile")
        log.info("template %s (%s) for tenant %s: database %s to fill", template.id, key, principal.tenant, database.id)
        return template, database

    def _abandoned(self, template: Template) -> bool:
        """A build that nobody can finish: its database failed or went, or it
        never got one (the process that began it ended in between)."""
        if template.status != TemplateStatus.BUILDING:
            return False
        if template.database_id is None:
            return utcnow() - template.created_at > _UNFILLED_GRACE
        with self.store.read() as session:
            status = session.scalar(select(Database.status).where(Database.id == template.database_id))
        return status is None or status == Status.FAILED or status in DELETING_OR_DELETED

    def _unless_building(self, template: Template) -> Template:
        if template.status in (TemplateStatus.BUILDING, TemplateStatus.FINALIZING):
            raise Locked(
                f"template {template.key!r} is being built by another client; ask again shortly",
                template=template.key,
            )
        return template

    def finalize(self, principal: Principal, key: str, pool_size: int) -> Template:
        """Take the template's snapshot from its filled database; it is usable once ready."""
        template = self.get(principal, key)
        if template.status != TemplateStatus.BUILDING:
            raise Conflict(f"template {key!r} is {template.status.value}, not being built")
        if template.database_id is None:
            raise Conflict(f"template {key!r} has no database to finalize yet")
        if not 0 <= pool_size <= MAX_POOL:
            raise ValidationError(f"pool_size must be 0 to {MAX_POOL}")
        record = self.snapshots.ready_for_snapshot(principal, template.database_id)
        # One transaction: the reconciler may take the snapshot and settle the
        # template at once, which it can only do to a finalizing one.
        with self.store.transaction() as session:
            self.registry.tenants.reserve_pool(session, principal.tenant, pool_size)
            snapshot = self.registry.add_snapshot(session, record, principal.actor, template_id=template.id)
            template = self._update(
                session, template.id, {TemplateStatus.BUILDING}, status=TemplateStatus.FINALIZING,
                snapshot_id=snapshot.id, pool_size=pool_size,
            )
            if template is None:
                raise Conflict(f"template {key!r} changed meanwhile")
        return template

    def get(self, principal: Principal, key: str) -> Template:
        _check_key(key)
        template = self._live(principal.tenant, key)
        if template is None:
            raise NotFound(f"no template {key!r}")
        return template

    def usable(self, principal: Principal, key: str) -> Template:
        """A ready template to clone; ``Locked`` while it is being built."""
        template = self._unless_building(self.get(principal, key))
        if template.status != TemplateStatus.READY:
            raise Conflict(f"template {key!r} is {template.status.value}")
        return template

    def list(self, principal: Principal) -> list[Template]:
        with self.store.read() as session:
            return list(session.scalars(
                select(Template)
                .where(Template.tenant == principal.tenant, Template.status != TemplateStatus.DELETED)
                .order_by(Template.created_at)
            ))

    def delete(self, principal: Principal, key: str) -> Template:
        """Remove the template with its snapshot, its database and its warm pool."""
        template = self._drop(self.get(principal, key).id, set(TemplateStatus) - {TemplateStatus.DELETED},
                              principal.actor)
        if template is None:
            raise NotFound(f"no template {key!r}")
        return template

    def _drop(self, template_id: str, expected: set[TemplateStatus], actor: str) -> Template | None:
        """The template deleted if it is in one of ``expected``, with its
        snapshot, its builder's database and its warm pool."""
        with self.store.transaction() as session:
            # The row as it is now: a finalize may have given it a snapshot
            # since the caller read it.
            template = self._update(session, template_id, expected, status=TemplateStatus.DELETED)
            if template is None:
                return None
            mine = Database.tenant == POOL_TENANT
            if template.snapshot_id is None:
                # No clone exists before the snapshot: every database of the
                # template is its builder's, recorded or not on the template.
                mine = true()
            elif template.database_id is not None:
                mine = mine | (Database.id == template.database_id)
            owned = session.scalars(
                select(Database.id).where(
                    # Clones handed to a tenant are the tenant's now; the pool and the builder go.
                    Database.template_id == template.id, Database.status.not_in(list(DELETING_OR_DELETED)), mine,
                )
            ).all()
            for database_id in owned:
                self.records.transition(
                    database_id, set(Status) - DELETING_OR_DELETED, session=session, actor=actor, status=Status.DELETING,
                )
            if template.snapshot_id:
                self.snapshots.mark_unused(session, [template.snapshot_id])
        log.info("template %s (%s) deleted with %d databases", template.id, template.key, len(owned))
        return template

    def settle(self, session: Session, template_id: str, snapshot_ready: bool) -> None:
        """The reconciler's word on a finalizing template's snapshot, in the
        snapshot's own transaction: a crash in between would leave the
        template finalizing for good."""
        if snapshot_ready:
            template = self._update(
                session, template_id, {TemplateStatus.FINALIZING}, status=TemplateStatus.READY, ready_at=utcnow()
            )
            if template is not None and template.database_id:
                # Filled and copied: the builder's database has done its job.
                self.records.transition(
                    template.database_id, set(Status) - DELETING_OR_DELETED, session=session, status=Status.DELETING
                )
        else:
            self._update(session, template_id, {TemplateStatus.FINALIZING}, status=TemplateStatus.FAILED)

    def _live(self, tenant: str, key: str) -> Template | None:
        with self.store.read() as session:
            return session.scalar(
                select(Template).where(
                    Template.tenant == tenant, Template.key == key, Template.status != TemplateStatus.DELETED
                )
            )

    def _set(self, template_id: str, expected: set[TemplateStatus], **values) -> Template | None:
        """Compare-and-set on a template's status, announced so that waiters look again."""
        with self.store.transaction() as session:
            return self._update(session, template_id, expected, **values)

    def _update(self, session: Session, template_id: str, expected: set[TemplateStatus], **values) -> Template | None:
        return self.records.compare_and_set(session, Template, template_id, expected, **values)

    def wait_until_settled(self, principal: Principal, key: str, timeout: float) -> Template:
        """The template once it is no longer finalizing, or as it is when ``timeout`` runs out."""
        return self.records.wait(
            lambda: self.get(principal, key), lambda t: t.status == TemplateStatus.FINALIZING, timeout
        )



def _check_key(key: str) -> None:
    if not re.fullmatch(KEY_PATTERN, key):
        raise NotFound(f"no template {key!r}")
