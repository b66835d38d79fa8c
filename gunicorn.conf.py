"""gunicorn settings for the API in a deployment:

    gunicorn -c gunicorn.conf.py 'service.app:create_app()'

The API runs alone here: `dbprov worker` processes migrate and reconcile, and
each API worker runs only the change feed beside it. The settings and hooks are
service/web.py's, which `dbprov serve` uses too. Each setting can be
overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import os

from service import web

# gunicorn takes its settings from this module's names.
globals().update(web.settings(
    bind=os.environ.get("DBPROV_LISTEN", "0.0.0.0:8080"),
    workers=int(os.environ.get("DBPROV_WEB_WORKERS", "4")),
    threads=int(os.environ.get("DBPROV_WEB_THREADS", "16")),
    migrate=False,
    reconcile=False,
    multiprocess_metrics=True,
))
