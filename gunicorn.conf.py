"""gunicorn settings for the API in a deployment:

    gunicorn -c gunicorn.conf.py 'service.app:create_app()'

The API runs alone here; `dbprov worker` processes reconcile. Each setting can
be overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import os

bind = os.environ.get("DBPROV_LISTEN", "0.0.0.0:8080")
workers = int(os.environ.get("DBPROV_WEB_WORKERS", "4"))
# A create waits, mostly idle, until its database is ready: threads let one
# worker hold many such waits while still answering quick reads. The waits
# block in psycopg and socket calls, which gthread needs no patching for.
worker_class = "gthread"
threads = int(os.environ.get("DBPROV_WEB_THREADS", "16"))
# Longer than DBPROV_REQUEST_TIMEOUT (90 s by default), so a SIGTERM lets
# waiting creates answer instead of cutting them off.
graceful_timeout = 100
timeout = 120
accesslog = "-"
# gunicorn's control socket would sit at one path in the home folder for every
# instance; dbprov does not use it.
control_socket_disable = True
