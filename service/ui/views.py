"""The web page's views: read the form, call the domain layer, render a template.

Like the API's views they go through ``current_app.extensions["dbprov"]``
(the Services object) and never reach the metadata store or the engine
themselves. A plain Flask blueprint: none of this is in the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException

from ..api.problems import PROBLEMS
from ..domain.models import Database, Status, utcnow
from ..domain.requests import NAME_PATTERN, CreateRequest
from ..domain.tenancy import LOCAL_ADMIN, POOL_TENANT, Principal
from ..errors import DbprovError, NotFound, Unauthorized, ValidationError
from . import present
from .security import CSRF_FIELD, PREFIX, CsrfError, check_csrf, csrf_token

ui = Blueprint(
    "ui", __name__, url_prefix=PREFIX, template_folder="templates", static_folder="static"
)

# Reachable without signing in.
PUBLIC = frozenset({"ui.signin", "ui.static"})
# Asked for by the page's script: a 401 instead of a redirect to the sign-in page.
FETCHED = frozenset({"ui.rows", "ui.status", "ui.uri"})
# A listing stops here; the page is for people, the API pages through everything.
_LISTED = 500
LOG_TAIL = 100
EVENTS_SHOWN = 100

# What each confirmed action is called, what it does, and whether it loses something.
ACTIONS: dict[str, dict[str, Any]] = {
    "stop": {
        "verb": "Stop",
        "explain": "Its server shuts down and frees its memory. The data, the port and the "
        "password stay; start it again at any time.",
        "danger": False,
    },
    "start": {
        "verb": "Start",
        "explain": "Its server starts again on the same port, with the same data and password.",
        "danger": False,
    },
    "rotate": {
        "verb": "Rotate the password of",
        "button": "Rotate password",
        "explain": "It gets a new password, shown once this is done. The old one stops working "
        "at once: clients using it must reconnect with the new one.",
        "danger": True,
    },
    "delete": {
        "verb": "Delete",
        "explain": "Its server and all its data are removed and its port is freed. "
        "This cannot be undone.",
        "danger": True,
    },
}


def _services():
    return current_app.extensions["dbprov"]


def _principal() -> Principal:
    return g.ui_principal


def _status_of(error: DbprovError) -> int:
    """The HTTP status the API gives the same error (its table, ``api.problems``)."""
    for cls in type(error).__mro__:
        if cls in PROBLEMS:
            return PROBLEMS[cls][0]
    return 500


def _signed_in() -> Principal | None:
    """Who the session acts for: the token it holds, checked again (a revoked one ends it)."""
    services = _services()
    if not services.auth_required:
        return LOCAL_ADMIN
    sealed = session.get("token")
    if not sealed:
        return None
    try:
        token = services.vault.decrypt(sealed)
    except DbprovError:
        # Sealed under a key the service no longer has.
        session.pop("token", None)
        return None
    try:
        return services.tenants.authenticate(f"Bearer {token}")
    except Unauthorized:
        session.pop("token", None)
        flash("Your token no longer works: it was revoked. Sign in with another one.", "error")
        return None


@ui.before_request
def _guard() -> Response | None:
    if request.endpoint == "ui.static":
        return None
    if request.method == "POST":
        check_csrf()
    principal = g.ui_principal = _signed_in()
    if principal is None and request.endpoint not in PUBLIC:
        if request.endpoint in FETCHED:
            return Response("sign in first", status=401, mimetype="text/plain")
        return redirect(url_for("ui.signin"))
    services = _services()
    if request.method == "POST" and principal is not None and services.auth_required:
        deleting = request.endpoint == "ui.act" and (request.view_args or {}).get("action") == "delete"
        if request.endpoint != "ui.signout" and not deleting:
            # A change through the page counts against the token like one
            # through the API, where deletes are free too.
            services.tenants.check_rate(principal)
    return None


@ui.context_processor
def _context() -> dict[str, Any]:
    return {
        "principal": g.get("ui_principal"),
        "auth_required": _services().auth_required,
        "csrf_token": csrf_token,
        "csrf_field": CSRF_FIELD,
        "age": present.age,
        "expiry": present.expiry,
        "stamp": present.stamp,
        "busy": present.BUSY,
    }


# -- errors -------------------------------------------------------------------


def _error_page(status: int, title: str, detail: str, headers: dict[str, str] | None = None):
    return render_template("ui/error.html", status=status, title=title, detail=detail), status, headers or {}


@ui.errorhandler(DbprovError)
def _domain_error(error: DbprovError):
    status = _status_of(error)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
    title = {404: "Not found", 403: "Not allowed", 409: "Not possible now", 429: "Too many changes"}.get(
        status, "Something went wrong" if status >= 500 else "Not possible"
    )
    return _error_page(status, title, error.detail, headers)


@ui.errorhandler(CsrfError)
def _csrf_error(error: CsrfError):
    return _error_page(
        400, "Form expired",
        f"Nothing was changed: {error}. Go back, reload the page and try again.",
    )


@ui.errorhandler(HTTPException)
def _http_error(error: HTTPException):
    return _error_page(error.code or 500, error.name, error.description or "")


# -- signing in -----------------------------------------------------------------


@ui.get("")
@ui.get("/")
def home():
    return redirect(url_for("ui.databases"))


@ui.route("/signin", methods=["GET", "POST"])
def signin():
    services = _services()
    if request.method == "GET":
        if _principal() is not None:
            return redirect(url_for("ui.databases"))
        return render_template("ui/signin.html")
    if not services.auth_required:
        return redirect(url_for("ui.databases"), 303)
    token = request.form.get("token", "").strip()
    try:
        principal = services.tenants.authenticate(f"Bearer {token}")
    except Unauthorized:
        # The token is never echoed back into the page.
        return render_template(
            "ui/signin.html", error="That token is unknown or revoked." if token else "Enter a token."
        ), 401
    # A new session: nothing from before signing in carries over, the CSRF token included.
    session.clear()
    session.permanent = True
    session["token"] = services.vault.encrypt(token)
    csrf_token()
    flash(f"Signed in to tenant {principal.tenant}{' as an admin' if principal.admin else ''}.", "info")
    return redirect(url_for("ui.databases"), 303)


@ui.post("/signout")
def signout():
    session.clear()
    flash("Signed out.", "info")
    return redirect(url_for("ui.signin"), 303)


# -- databases ------------------------------------------------------------------


def _listing(principal: Principal, include_deleted: bool) -> list[Database]:
    """The databases the page lists, newest first: live ones, or every one."""
    domain = _services().databases
    page = domain.list(principal, page=1, page_size=_LISTED)
    items = page.items
    if not include_deleted:
        items = [record for record in items if record.status != Status.DELETED]
        # Deleted ones take room in a page; live ones further back are still listed.
        number = 1
        while page.total > number * _LISTED and len(items) < _LISTED:
            number += 1
            page = domain.list(principal, page=number, page_size=_LISTED)
            items += [record for record in page.items if record.status != Status.DELETED]
    return items


def _rows_context() -> dict[str, Any]:
    principal = _principal()
    include_deleted = request.args.get("deleted") == "1"
    return {
        "records": _listing(principal, include_deleted),
        "include_deleted": include_deleted,
        "show_tenant": principal.admin,
        "now": utcnow(),
    }


def _create_form(values: dict[str, str] | None = None) -> dict[str, Any]:
    services = _services()
    settings = services.settings
    allowed = services.tenants.plans(_principal().tenant)
    plans = [plan for name, plan in settings.all_plans.items() if allowed is None or name in allowed]
    return {
        "versions": list(settings.images),
        "default_version": settings.default_version,
        "ttl_choices": present.ttl_choices(settings),
        "plans": [(plan.name, present.plan_label(plan)) for plan in plans],
        # As an HTML pattern (a /v regular expression): a hyphen in a class is escaped.
        "name_pattern": NAME_PATTERN.strip("^$").replace("-]", r"\-]"),
        "values": values or {},
    }


def _list_page(
    values: dict[str, str] | None = None, error: str | None = None, status: int = 200,
    field_errors: dict[str, str] | None = None,
):
    used, limit = _services().tenants.quota(_principal().tenant)
    return render_template(
        "ui/databases.html", active="databases", used=used, limit=limit, error=error,
        field_errors=field_errors or {},
        **_rows_context(), **_create_form(values),
    ), status


@ui.get("/databases")
def databases():
    return _list_page()


@ui.get("/databases/rows")
def rows():
    """The list's rows alone, which the page's script fetches to keep them current."""
    return render_template("ui/_rows.html", **_rows_context())


@ui.post("/databases")
def create():
    principal = _principal()
    form = {key: request.form.get(key, "").strip() for key in ("version", "name", "ttl", "plan")}
    try:
        ttl = None
        if form["ttl"]:
            if not form["ttl"].isdigit() or int(form["ttl"]) <= 0:
                raise ValidationError("the expiry must be a number of seconds")
            ttl = int(form["ttl"])
        record = _services().databases.create(principal, CreateRequest(
            name=form["name"] or None, version=form["version"] or None, ttl=ttl, plan=form["plan"] or None,
        ))
    except DbprovError as error:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
        # A validation error names its fields, as in the API's problem document.
        fields = (error.extensions.get("errors") or {}).get("json") or {}
        page, status = _list_page(
            form, error.detail, _status_of(error),
            {name: " ".join(messages) for name, messages in fields.items() if name in form},
        )
        return page, status, headers
    flash(f"Database {record.name or record.id} is being created.", "info")
    return redirect(url_for("ui.database", database_id=record.id), 303)


def _detail_page(database_id: str, credentials=None, message: str | None = None):
    services = _services()
    principal = _principal()
    record = services.databases.get(principal, database_id)
    # The latest: a database renewed every minute as a CI heartbeat has
    # hours of events, and its first ones say little now.
    events = services.databases.events(principal, database_id, limit=EVENTS_SHOWN, latest=True)
    contents, contents_note = [], None
    if record.status == Status.READY:
        try:
            contents = services.dumps.contents(principal, database_id)
        except DbprovError as error:
            contents_note = f"Its databases cannot be listed now: {error.detail}"
    log_text, log_note = None, None
    try:
        log_text = services.databases.logs(principal, database_id, LOG_TAIL)
    except NotFound:
        log_note = "Nothing is left of its server's log."
    except DbprovError as error:
        log_note = f"The log cannot be read now: {error.detail}"
    return render_template(
        "ui/database.html",
        active="databases",
        record=record,
        events=list(reversed(events)),
        contents=contents,
        contents_note=contents_note,
        log_text=log_text,
        log_note=log_note,
        log_tail=LOG_TAIL,
        host=services.databases.host(record),
        credentials=credentials,
        message=message,
        actions=_available(record),
        now=utcnow(),
    )


def _available(record: Database) -> list[str]:
    """The confirmed actions the database's status allows now."""
    if record.status in (Status.DELETING, Status.DELETED):
        return []
    actions = []
    if record.status == Status.READY:
        actions += ["stop", "rotate"]
    if record.status == Status.SLEEPING:
        actions.append("stop")
    if record.status in (Status.STOPPED, Status.SLEEPING):
        actions.append("start")
    if not record.protected:
        actions.append("delete")
    return actions


@ui.get("/databases/<database_id>")
def database(database_id: str):
    return _detail_page(database_id)


@ui.get("/databases/<database_id>/status")
def status(database_id: str):
    """The database's status, which the detail page's script polls."""
    record = _services().databases.get(_principal(), database_id)
    return jsonify(status=record.status.value, busy=record.status in present.BUSY)


@ui.get("/databases/<database_id>/uri")
def uri(database_id: str):
    """The connection URI for the copy button; only for the page's script (it sends the CSRF token)."""
    # A GET that answers a password: only to a script of this session's pages.
    check_csrf(header_only=True)
    domain = _services().databases
    record = domain.get(_principal(), database_id)
    credentials = domain.credentials(record)
    if credentials.connection_uri is None:
        return jsonify(error=f"database {database_id} holds no port now"), 409
    return jsonify(connection_uri=credentials.connection_uri)


@ui.post("/databases/<database_id>/reveal")
def reveal(database_id: str):
    domain = _services().databases
    record = domain.get(_principal(), database_id)
    return _detail_page(database_id, credentials=domain.credentials(record))


@ui.get("/databases/<database_id>/<any(stop, start, rotate, delete):action>")
def confirm(database_id: str, action: str):
    record = _services().databases.get(_principal(), database_id)
    return render_template(
        "ui/confirm.html", active="databases", record=record, action=action, **ACTIONS[action]
    )


@ui.post("/databases/<database_id>/<any(stop, start, rotate, delete):action>")
def act(database_id: str, action: str):
    domain = _services().databases
    principal = _principal()
    if action == "rotate":
        _record, credentials = domain.rotate_password(principal, database_id)
        return _detail_page(
            database_id, credentials=credentials,
            message="It has a new password; the old one no longer works.",
        )
    record = {"stop": domain.stop, "start": domain.start, "delete": domain.delete}[action](
        principal, database_id
    )
    label = record.name or record.id
    if action == "delete":
        flash(f"Database {label} is being deleted.", "info")
        return redirect(url_for("ui.databases"), 303)
    flash(f"Database {label} is {'stopping' if action == 'stop' else 'starting'}.", "info")
    return redirect(url_for("ui.database", database_id=database_id), 303)


# -- the operator's view ------------------------------------------------------


@ui.get("/admin")
def admin():
    if not _principal().admin:
        return _error_page(403, "Admins only", "This page is for admin tokens.")
    services = _services()
    overview = current_app.extensions["dbprov_ui"]
    try:
        images = services.images.check(pull=False)
    except DbprovError as error:
        images = dict.fromkeys(services.settings.images, f"unknown: {error.detail}")
    return render_template(
        "ui/admin.html",
        active="admin",
        pool=overview.pool(),
        pooling=bool(services.settings.pool_sizes),
        images=images,
        ports=overview.ports(),
        tenants=services.tenants.summaries(),
        pool_tenant=POOL_TENANT,
    )
