"""Tenants, their tokens, quotas and rate limits."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Row, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ..errors import Forbidden, NotFound, QuotaExceeded, RateLimited, Unauthorized, ValidationError
from ..settings import Settings
from ..store.engine import Store
from .models import Database, RateBucket, Status, Template, TemplateStatus, Tenant, Token, utcnow

log = logging.getLogger(__name__)

TENANT_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
DEFAULT_TENANT = "default"
# Owner of the warm pool's members; TENANT_PATTERN keeps tokens from ever acting for it.
POOL_TENANT = "_pool"
# dbp_<id>.<secret>: the id finds the record, the secret is checked against its hash.
_TOKEN_PATTERN = re.compile(r"dbp_([0-9a-f]{12})\.([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class Principal:
    """Who is asking: a tenant, perhaps with the right to see every tenant."""

    tenant: str
    admin: bool = False
    token_id: str | None = None

    def sees(self, record: Database) -> bool:
        return self.admin or record.tenant == self.tenant

    @property
    def rate_key(self) -> str:
        return self.token_id or f"tenant:{self.tenant}"

    @property
    def actor(self) -> str:
        """Who did it, as events record it."""
        return f"token:{self.token_id}" if self.token_id else "local"


@dataclass(frozen=True)
class TenantSummary:
    """One tenant as an operator sees it: its databases, limit, plans and tokens."""

    name: str
    live: int
    limit: int
    # None: every plan.
    plans: list[str] | None
    tokens: int
    admin_tokens: int
    created_at: datetime | None


# Who every request is when authentication is off (`dbprov serve --no-auth`).
LOCAL_ADMIN = Principal(tenant=DEFAULT_TENANT, admin=True)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    if not re.fullmatch(TENANT_PATTERN, name):
        raise ValidationError(
            f"invalid tenant name {name!r}: lower-case letters, digits, '_' and '-', at most 63"
        )
    return name


class Tenants:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    # -- tokens -------------------------------------------------------------

    def create_token(self, tenant: str, admin: bool = False) -> tuple[Token, str]:
        """A new token for ``tenant`` (made if new); the plaintext exists only in the return value."""
        check_tenant_name(tenant)
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        with self.store.transaction() as session:
            if session.get(Tenant, tenant) is None:
                session.add(Tenant(name=tenant))
                session.flush()
            token = Token(id=token_id, tenant=tenant, admin=admin, secret_hash=_hash(secret))
            session.add(token)
        log.info("token %s created for tenant %s%s", token_id, tenant, " (admin)" if admin else "")
        return token, f"dbp_{token_id}.{secret}"

    def list_tokens(self) -> list[Token]:
        with self.store.read() as session:
            return list(session.scalars(select(Token).order_by(Token.tenant, Token.created_at)))

    def revoke_token(self, token_id: str) -> Token:
        with self.store.transaction() as session:
            token = session.get(Token, token_id)
            if token is None:
                raise NotFound(f"no token with id {token_id!r}")
            if token.revoked_at is None:
                token.revoked_at = utcnow()
        log.info("token %s revoked", token_id)
        return token

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("this endpoint needs an Authorization: Bearer token", error=None)
        scheme, _, credentials = authorization.partition(" ")
        match = _TOKEN_PATTERN.fullmatch(credentials.strip())
        if scheme.lower() != "bearer" or not match:
            raise Unauthorized("the Authorization header does not hold a dbprov bearer token")
        token_id, secret = match.groups()
        with self.store.lookup() as connection:
            token = connection.execute(_TOKEN_CHECK, {"id": token_id}).first()
        if (
            token is None
            or not hmac.compare_digest(token.secret_hash, _hash(secret))
            or token.revoked_at is not None
        ):
            raise Unauthorized("the token is unknown or revoked")
        return Principal(tenant=token.tenant, admin=token.admin, token_id=token_id)

    # -- quotas -------------------------------------------------------------

    def set_limit(self, tenant: str, limit: int | None) -> None:
        """Give ``tenant`` its own limit, or back to the default with None."""
        if limit is not None and limit < 0:
            raise ValidationError("the limit cannot be negative")
        with self.store.transaction() as session:
            record = session.get(Tenant, check_tenant_name(tenant))
            if record is None:
                raise NotFound(f"no tenant {tenant!r}")
            record.database_limit = limit

    def plans(self, tenant: str) -> list[str] | None:
        """The plans ``tenant``'s databases may use; None: every plan."""
        with self.store.read() as session:
            record = session.get(Tenant, tenant)
        return None if record is None else record.plans

    def set_plans(self, tenant: str, plans: list[str] | None) -> None:
        """Restrict ``tenant`` to ``plans``, or lift the restriction with None."""
        unknown = set(plans or ()) - set(self.settings.all_plans)
        if unknown:
            raise ValidationError(f"no such plans: {', '.join(sorted(unknown))}")
        with self.store.transaction() as session:
            record = session.get(Tenant, check_tenant_name(tenant))
            if record is None:
                raise NotFound(f"no tenant {tenant!r}")
            record.plans = plans

    def quota(self, tenant: str) -> tuple[int, int]:
        """Live databases of ``tenant`` (see ``count_live``) and its limit."""
        with self.store.read() as session:
            return count_live(session, tenant), self._limit(session.get(Tenant, tenant))

    def room(self, tenant: str) -> int:
        """How many more databases ``tenant`` may hold, as the warm pool stocks
        clones of its templates: below zero if it holds more than it may."""
        with self.store.read() as session:
            return self._cap(session.get(Tenant, tenant), admin=False)[0] - count_live(session, tenant)

    def _limit(self, record: Tenant | Row | None) -> int:
        if record is not None and record.database_limit is not None:
            return record.database_limit
        return self.settings.tenant_quota

    def _cap(self, record: Tenant | Row | None, admin: bool) -> tuple[int, str]:
        """The most databases the tenant may hold, and why, if not its limit:
        each holds a host port, and however high its limit, other tenants
        must still find free ones. Admins are the operator's: the share keeps
        tenants from one another, not from them."""
        limit = self._limit(record)
        first, last = self.settings.port_range
        share = max(1, int((last - first + 1) * self.settings.tenant_port_share))
        if admin or limit <= share:
            return limit, ""
        return share, (
            f", the most one tenant may hold: {self.settings.tenant_port_share:g} of the "
            f"{last - first + 1} host ports (DBPROV_TENANT_PORT_SHARE)"
        )

    def lock(self, session: Session, tenant: str) -> Row | None:
        """Inside a transaction: hold ``tenant``'s row, so that counts against its
        limits are made one after another (SQLite's BEGIN IMMEDIATE does it
        already); its plans and database_limit, or None if it has no row."""
        return session.execute(_TENANT_LOCK, {"tenant": tenant}).first()

    def reserve(self, session: Session, tenant: str, plan: str, adding: int = 1, admin: bool = False) -> None:
        """Inside a create's transaction: refuse it if ``tenant`` may not use
        ``plan``, or if ``adding`` more databases would take it over its limit
        (none for a claim of its own template's warm clone, counted already).

        On PostgreSQL the tenant's row is locked first, so parallel creates of
        one tenant count one after another; SQLite's BEGIN IMMEDIATE already
        serialises every writer.
        """
        record = self.lock(session, tenant)
        allowed = None if record is None else record.plans
        if allowed is not None and plan not in allowed:
            raise Forbidden(f"tenant {tenant!r} may use the plans {', '.join(allowed) or 'none'}, not {plan!r}")
        used, (limit, why) = count_live(session, tenant), self._cap(record, admin)
        if used + adding > limit:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {used} of {limit} databases{why}; delete one first",
                used=used,
                limit=limit,
            )

    def reserve_pool(self, session: Session, tenant: str, size: int) -> None:
        """Inside a template's finalize: refuse a warm pool of ``size`` clones
        that would take ``tenant`` over its limit. The template's own database
        makes room for one: it goes once its snapshot is taken."""
        limit, why = self._cap(self.lock(session, tenant), admin=False)
        used = count_live(session, tenant)
        if size and used - 1 + size > limit:
            raise QuotaExceeded(
                f"a warm pool of {size} would take tenant {tenant!r} over its limit: it has {used} of "
                f"{limit} databases{why}, the template's own among them; "
                f"ask for at most {max(0, limit - used + 1)}",
                used=used,
                limit=limit,
            )

    def reserve_template(self, session: Session, tenant: str) -> None:
        """Inside a new template's transaction: refuse it if ``tenant`` has
        DBPROV_TENANT_TEMPLATES live templates already."""
        self.lock(session, tenant)
        used, limit = session.scalar(_TEMPLATE_COUNT, {"tenant": tenant}), self.settings.tenant_templates
        if used >= limit:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {used} of {limit} templates; delete one first",
                used=used,
                limit=limit,
            )

    def summaries(self) -> list[TenantSummary]:
        """Every tenant (the warm pool's excepted), by name, with its live
        databases (its templates' warm clones included), limit, plans and
        tokens that still work."""
        with self.store.read() as session:
            tenants = list(session.scalars(
                select(Tenant).where(Tenant.name != POOL_TENANT).order_by(Tenant.name)
            ))
            live = dict(session.execute(
                select(Database.tenant, func.count())
                .where(Database.status != Status.DELETED)
                .group_by(Database.tenant)
            ).all())
            for tenant, count in session.execute(
                select(Template.tenant, func.count())
                .join(Database, Database.template_id == Template.id)
                .where(Database.tenant == POOL_TENANT, Database.status != Status.DELETED)
                .group_by(Template.tenant)
            ):
                live[tenant] = live.get(tenant, 0) + count
            tokens = session.execute(
                select(Token.tenant, Token.admin, func.count())
                .where(Token.revoked_at.is_(None))
                .group_by(Token.tenant, Token.admin)
            ).all()
        working: dict[str, dict[bool, int]] = {}
        for tenant, admin, count in tokens:
            working.setdefault(tenant, {})[bool(admin)] = count
        return [
            TenantSummary(
                name=tenant.name,
                live=live.get(tenant.name, 0),
                limit=self.settings.tenant_quota if tenant.database_limit is None else tenant.database_limit,
                plans=tenant.plans,
                tokens=sum(working.get(tenant.name, {}).values()),
                admin_tokens=working.get(tenant.name, {}).get(True, 0),
                created_at=tenant.created_at,
            )
            for tenant in tenants
        ]

    # -- rate limits --------------------------------------------------------

    def check_rate(self, principal: Principal) -> None:
        """Count a request that costs the service work; refuse it past the token's bucket.

        A bucket per token (GCRA): DBPROV_RATE_BURST requests at once, refilled
        at DBPROV_RATE_LIMIT a minute. One statement: the token's theoretical
        arrival time moves on by one interval unless that would take it past
        the burst, in which case no row comes back.
        """
        interval = 60.0 / self.settings.rate_limit
        tolerance = interval * (self.settings.rate_burst - 1)
        now = time.time()
        dialect = postgresql if self.store.is_postgres else sqlite
        # Two-argument max() is SQLite's scalar maximum; PostgreSQL calls it greatest().
        later = (func.greatest if self.store.is_postgres else func.max)(RateBucket.due, now)
        statement = (
            dialect.insert(RateBucket)
            .values(key=principal.rate_key, due=now + interval)
            .on_conflict_do_update(
                index_elements=["key"], set_={"due": later + interval}, where=later - now <= tolerance
            )
            .returning(RateBucket.due)
        )
        with self.store.transaction() as session:
            taken = session.scalar(statement)
            if taken is None:
                due = session.scalar(select(RateBucket.due).where(RateBucket.key == principal.rate_key))
        if taken is None:
            raise RateLimited(
                f"more than {self.settings.rate_burst} requests at once, or {self.settings.rate_limit} a "
                "minute after them (creates, snapshots, resets, restores, dumps, rotations, starts and stops; "
                "deletes and renewals are not counted)",
                retry_after=math.ceil(due - now - tolerance),
            )


def count_live(session: Session, tenant: str) -> int:
    """The databases ``tenant`` holds: its own that are not deleted, and the
    warm pool's clones of its templates. Each is a server and a port."""
    return session.scalar(_LIVE_COUNT, {"tenant": tenant})


# Every request asks this: the four columns it needs, not a Token.
_TOKEN_CHECK = select(Token.tenant, Token.admin, Token.secret_hash, Token.revoked_at).where(
    Token.id == bindparam("id")
)
# Built once: every create runs the lock and the count in its transaction,
# where making them cost more than running them.
_TENANT_LOCK = (
    select(Tenant.plans, Tenant.database_limit).where(Tenant.name == bindparam("tenant")).with_for_update()
)
# Two counts added rather than one with OR: each reads its own index.
_LIVE_COUNT = select(
    select(func.count()).select_from(Database).where(
        Database.tenant == bindparam("tenant"), Database.status != Status.DELETED
    ).scalar_subquery()
    + select(func.count()).select_from(Database).join(Template, Template.id == Database.template_id).where(
        # A deleted template's clones count until they are gone, as a deleting database does.
        Database.tenant == POOL_TENANT, Template.tenant == bindparam("tenant"),
        Database.status != Status.DELETED,
    ).scalar_subquery()
)
_TEMPLATE_COUNT = select(func.count()).select_from(Template).where(
    Template.tenant == bindparam("tenant"), Template.status != TemplateStatus.DELETED
)

