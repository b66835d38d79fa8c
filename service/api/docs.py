"""The interactive API docs at ``/docs``: flask-smorest's Swagger UI page, its
scripts and stylesheet from the swagger-ui-bundle package, served by the app.

``/docs`` shares its origin with the web page (``/ui``) and its session, so
whatever script runs there could act as the signed-in person: none comes from
another host, and a Content-Security-Policy lets the page load nothing from
elsewhere, nor run any inline script but flask-smorest's own (by its hash).
"""

from __future__ import annotations

import base64
import hashlib
import re

from flask import Flask, Response, abort, request, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from ..ui.security import content_security_policy

URL = "/docs/static/"
# What flask-smorest's page loads. Not the rest of the bundle: its example
# page fetches a document from another host.
FILES = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"})
# The Swagger UI options flask-smorest passes on. Without a validatorUrl of
# null, the page shows a badge loaded from swagger.io, telling it where the
# document is.
CONFIG = {"validatorUrl": None}
_PAGE = "api-docs.openapi_swagger_ui"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def init_app(app: Flask) -> None:
    @app.get(URL + "<name>")
    def swagger_ui_file(name: str) -> Response:
        if name not in FILES:
            abort(404)
        return send_from_directory(swagger_ui_path, name)

    @app.after_request
    def _docs_policy(response: Response) -> Response:
        if request.endpoint == _PAGE:
            scripts = " ".join(
                f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
                for script in _INLINE_SCRIPT.findall(response.get_data(as_text=True))
            )
            response.headers["Content-Security-Policy"] = content_security_policy(scripts)
            response.headers["X-Content-Type-Options"] = "nosniff"
        return response
