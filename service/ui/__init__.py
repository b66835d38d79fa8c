"""The web page at ``/ui``: server-rendered templates and one small script, no build step.

``init_app(app)`` adds it to the API's Flask app as a plain blueprint, so
nothing of it appears in the OpenAPI document.
"""

from __future__ import annotations

from flask import Flask

from ..domain.overview import Overview
from . import security
from .views import ui


def init_app(app: Flask) -> None:
    services = app.extensions["dbprov"]
    security.configure(app, services.settings)
    app.extensions["dbprov_ui"] = Overview(services.settings, services.store)
    app.register_blueprint(ui)
