"""Tenants, their tokens, quotas and rate limits."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Row, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .errors import Forbidden, NotFound, QuotaExceeded, RateLimited, Unauthorized, ValidationError
from .models import Database, RateWindow, Status, Tenant, Token, utcnow
from .settings import Settings
from .store import Store

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
        """Live databases of ``tenant`` and its limit."""
        with self.store.read() as session:
            return count_live(session, tenant), self._limit(session.get(Tenant, tenant))

    def _limit(self, record: Tenant | Row | None) -> int:
        if record is not None and record.database_limit is not None:
            return record.database_limit
        return self.settings.tenant_quota

    def lock(self, session: Session, tenant: str) -> Row | None:
        """Inside a transaction: hold ``tenant``'s row, so that counts against its
        limits are made one after another (SQLite's BEGIN IMMEDIATE does it
        already); its plans and database_limit, or None if it has no row."""
        return session.execute(_TENANT_LOCK, {"tenant": tenant}).first()

    def reserve(self, session: Session, tenant: str, plan: str) -> None:
        """Inside a create's transaction: refuse it if ``tenant`` may not use
        ``plan`` or is at its limit.

        On PostgreSQL the tenant's row is locked first, so parallel creates of
        one tenant count one after another; SQLite's BEGIN IMMEDIATE already
        serialises every writer.
        """
        record = self.lock(session, tenant)
        allowed = None if record is None else record.plans
        if allowed is not None and plan not in allowed:
            raise Forbidden(f"tenant {tenant!r} may use the plans {', '.join(allowed) or 'none'}, not {plan!r}")
        used, limit = count_live(session, tenant), self._limit(record)
        if used >= limit:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {used} of {limit} databases; delete one first",
                used=used,
                limit=limit,
            )

    def summaries(self) -> list[TenantSummary]:
        """Every tenant (the warm pool's excepted), by name, with its live
        databases, limit, plans and tokens that still work."""
        with self.store.read() as session:
            tenants = list(session.scalars(
                select(Tenant).where(Tenant.name != POOL_TENANT).order_by(Tenant.name)
            ))
            live = dict(session.execute(
                select(Database.tenant, func.count())
                .where(Database.status != Status.DELETED)
                .group_by(Database.tenant)
            ).all())
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
        """Count a write request; refuse it once the token's minute is used up."""
        now = time.time()
        window = int(now // 60)
        insert = (postgresql if self.store.is_postgres else sqlite).insert(RateWindow)
        statement = (
            insert.values(key=principal.rate_key, window=window, count=1)
            .on_conflict_do_update(
                index_elements=["key", "window"], set_={"count": RateWindow.count + 1}
            )
            .returning(RateWindow.count)
        )
        with self.store.transaction() as session:
            count = session.scalar(statement)
            # Old windows are worthless; drop them as we go.
            session.execute(
                RateWindow.__table__.delete().where(
                    RateWindow.key == principal.rate_key, RateWindow.window < window
                )
            )
        if count > self.settings.rate_limit:
            raise RateLimited(
                f"more than {self.settings.rate_limit} write requests in a minute",
                retry_after=int(60 - now % 60) + 1,
            )


def count_live(session: Session, tenant: str) -> int:
    return session.scalar(_LIVE_COUNT, {"tenant": tenant})


# Every request asks this: the four columns it needs, not a Token.
_TOKEN_CHECK = select(Token.tenant, Token.admin, Token.secret_hash, Token.revoked_at).where(
    Token.id == bindparam("id")
)
# Built once: every create runs both in its transaction, where making them
# cost more than running them.
_TENANT_LOCK = (
    select(Tenant.plans, Tenant.database_limit).where(Tenant.name == bindparam("tenant")).with_for_update()
)
_LIVE_COUNT = select(func.count()).select_from(Database).where(
    Database.tenant == bindparam("tenant"), Database.status != Status.DELETED
)

