# dbprov's own image: the API under gunicorn by default, `dbprov worker` for the reconciler.
#   docker build -t dbprov .
# It drives the host's Docker engine through its socket; see the README for
# the socket's group and for how the service reaches tenant containers.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY client ./client
COPY pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations
# The client distribution (the `dbprov` command) first: the server depends on
# it, and it is not on a package index.
RUN python -m venv /opt/dbprov \
 && /opt/dbprov/bin/pip install --no-cache-dir --disable-pip-version-check ./client . \
 && /opt/dbprov/bin/python -m pip uninstall --yes --quiet pip setuptools
# The bytecode pip wrote stays: the unprivileged user could not write it, so
# each process (a gunicorn worker, a health check) would compile every module
# again, 2-5 s. pip and setuptools go instead: nothing runs them here.

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/dbprov /opt/dbprov
COPY gunicorn.conf.py /etc/dbprov/gunicorn.conf.py
# An unprivileged user; give it the Docker socket's group with --group-add.
RUN useradd --system --uid 10001 --home-dir /var/lib/dbprov --create-home dbprov
ENV PATH=/opt/dbprov/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DBPROV_DATA_DIR=/var/lib/dbprov
USER dbprov
WORKDIR /var/lib/dbprov
EXPOSE 8080
# Checks the API where DBPROV_LISTEN puts it; a worker container uses `dbprov worker --check`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('DBPROV_LISTEN', ':8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
CMD ["gunicorn", "-c", "/etc/dbprov/gunicorn.conf.py", "service.app:create_app()"]
