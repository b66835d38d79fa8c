"""The web page's defences: its session cookie, CSRF tokens and response headers.

- The session is Flask's signed cookie, scoped to ``/ui``, HttpOnly,
  SameSite=Strict, Secure whenever the request came over https, and valid for
  a limited time. Its signing key is derived from the service's secret key
  (``DBPROV_SECRET_KEY``, or the key file of the embedded default), so every
  process of an installation accepts the same cookies and nothing new needs
  configuring; the other configured keys stay accepted while a key is rotated.
- The API token a person signs in with is kept in that cookie encrypted with
  the service's vault, and checked again on every request, so a revoked token
  stops working in the page at once. It is never rendered into a page.
- Every POST carries a per-session CSRF token, compared in constant time; a
  browser's ``Sec-Fetch-Site: cross-site`` is refused as well.
- Every ``/ui`` response carries a Content-Security-Policy without inline
  scripts or styles, ``X-Frame-Options: DENY`` and friends; pages are not cached.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta

from flask import Flask, Response, request, session
from flask.sessions import SecureCookieSessionInterface

from ..settings import Settings

log = logging.getLogger(__name__)

PREFIX = "/ui"
COOKIE_NAME = "dbprov_ui"
# Idle time after which a person signs in again (the cookie is renewed on each request).
SESSION_LIFETIME = timedelta(hours=8)
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_PURPOSE = b"dbprov web page session v1"

def content_security_policy(scripts: str = "") -> str:
    """Nothing from another host, no framing; ``scripts``: the hashes of inline
    scripts allowed besides the origin's own files (the API docs' page has one)."""
    return "; ".join([
        "default-src 'self'",
        f"script-src 'self' {scripts}".strip(),
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ])


CONTENT_SECURITY_POLICY = content_security_policy()
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


class CsrfError(Exception):
    """A POST without this session's CSRF token, or sent from another site."""


def session_keys(settings: Settings) -> list[str]:
    """Signing keys for the session cookie, one per configured secret key, the first signing.

    Derived one way (HMAC-SHA256 under the secret key), so the cookie's key
    reveals nothing about the key that encrypts the stored passwords.
    """
    keys = list(settings.secret_keys)
    if not keys:
        # The embedded default's key file, which ``crypto.load_vault`` made
        # before any app could be built.
        path = settings.data_dir / "secret.key"
        try:
            keys = [path.read_text().strip()]
        except OSError:
            log.warning("no secret key to sign web sessions with; sessions last until a restart")
            keys = [secrets.token_urlsafe(32)]
    return [hmac.new(key.encode(), _PURPOSE, hashlib.sha256).hexdigest() for key in keys]


def _over_https() -> bool:
    # X-Forwarded-Proto only ever adds the Secure flag: a client claiming
    # https over plain http merely makes its own cookie unusable.
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.is_secure or forwarded == "https"


class UiSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, with Secure set per request when it came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or _over_https()

    def should_set_cookie(self, app: Flask, session) -> bool:
        # Only the page uses the session: API responses never set a cookie.
        return is_ui_request() and super().should_set_cookie(app, session)


def is_ui_request() -> bool:
    return request.path == PREFIX or request.path.startswith(PREFIX + "/")


def configure(app: Flask, settings: Settings) -> None:
    """Session cookie, signing keys and security headers for the page."""
    keys = session_keys(settings)
    app.secret_key = keys[0]
    app.config.update(
        SECRET_KEY_FALLBACKS=keys[1:],
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_PATH=PREFIX,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )
    app.session_interface = UiSessionInterface()

    @app.after_request
    def _ui_headers(response: Response) -> Response:
        # For every /ui response, its errors included (even an unmatched path).
        if is_ui_request():
            for name, value in HEADERS.items():
                response.headers.setdefault(name, value)
            if request.endpoint != "ui.static":
                # Pages hold a tenant's data, and sometimes a password.
                response.headers["Cache-Control"] = "no-store"
        return response


def csrf_token() -> str:
    """This session's CSRF token, made on first use."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
        # Signed with a time, renewed on each request: idle for SESSION_LIFETIME, it ends.
        session.permanent = True
    return token


def check_csrf(header_only: bool = False) -> None:
    """Refuse a request that did not come from one of this session's pages: a
    form's hidden field or a script's header must carry the session's token."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        raise CsrfError("the request came from another site")
    expected = session.get("csrf")
    sent = request.headers.get(CSRF_HEADER) or ("" if header_only else request.form.get(CSRF_FIELD)) or ""
    if not expected or not hmac.compare_digest(expected.encode(), sent.encode()):
        raise CsrfError("the form is stale or did not come from this page")
