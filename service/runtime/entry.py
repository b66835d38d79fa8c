"""The shell entries a server's container runs before the image's own: the first
start on data that begins initialised, and the certificate's files for TLS."""

from __future__ import annotations

from ..postgres.scram import alter_role_password
from ..storage.golden import GOLDEN_MARK
from .protocol import ServerCertificate

# The entry of a server on data that begins initialised (a golden copy), at
# every start. On the first, single-user mode (as the data's owner, listening
# nowhere) sets the superuser's password; a crash in between repeats the step.
# Data that is not there (an overlay on a golden volume that went) is never
# made anew by initdb: a server on it would pass an empty cluster off as the
# tenant's. A server killed while it wrote its lock file leaves it empty, and
# PostgreSQL will not start on that: only one server ever runs on this data,
# so it is stale. The image's own entrypoint then finds PG_VERSION and starts
# the server without initdb.
_FIRST_START = f"""set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "dbprov: no data directory under this server: its golden volume is gone or was empty" >&2
    exit 64
fi
if [ -e "$PGDATA/{GOLDEN_MARK}" ]; then
    printf '%s\\n' "$DBPROV_FIRST_START" | postgres --single -D "$PGDATA" postgres > /dev/null
    rm "$PGDATA/{GOLDEN_MARK}"
fi
unset DBPROV_FIRST_START
if [ -e "$PGDATA/postmaster.pid" ] && [ ! -s "$PGDATA/postmaster.pid" ]; then
    rm "$PGDATA/postmaster.pid"
fi
exec "$@"
"""

# Where a server's certificate and key are: in its container's own files,
# outside every volume, so that a snapshot or a clone never carries another
# server's key and a server made anew gets only its own. Under /tmp, which
# every image lets any user write to: the entry may run as root or as the
# image's postgres user (a golden copy's server), whose uid only the image knows.
TLS_DIR = "/tmp/dbprov-tls"
TLS_ARGS = (
    "-c", "ssl=on", "-c", f"ssl_cert_file={TLS_DIR}/server.crt", "-c", f"ssl_key_file={TLS_DIR}/server.key",
)
# The variables that carry them to the container (as POSTGRES_PASSWORD does
# the superuser's password): a Swarm service's container can be given no file
# before it starts, and a container made anew needs them again.
_TLS_CERTIFICATE, _TLS_KEY = "DBPROV_TLS_CERTIFICATE", "DBPROV_TLS_KEY"
# The entry of a server with TLS, at every start: the certificate and key
# into files its user owns, mode 0600 as PostgreSQL demands of a key,
# whichever user it starts as (root hands them over by name), then the entry
# that comes next, without them in its environment.
_TLS_START = f"""set -e
umask 077
mkdir -p {TLS_DIR}
printf '%s' "${_TLS_CERTIFICATE}" > {TLS_DIR}/server.crt
printf '%s' "${_TLS_KEY}" > {TLS_DIR}/server.key
if [ "$(id -u)" = 0 ]; then
    chown -R postgres {TLS_DIR}
fi
unset {_TLS_CERTIFICATE} {_TLS_KEY}
exec "$@"
"""


def first_start_entry(
    superuser: str, password: str, pgdata: str, entrypoint: list[str], environment: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """A server's entrypoint and environment on data that begins initialised at
    ``pgdata``: its first start gives ``superuser`` ``password``."""
    return (
        ["sh", "-c", _FIRST_START, "sh", *entrypoint],
        {**environment, "PGDATA": pgdata, "DBPROV_FIRST_START": alter_role_password(superuser, password)},
    )


def tls_entry(
    certificate: ServerCertificate, entrypoint: list[str], command: list[str], environment: dict[str, str]
) -> tuple[list[str], list[str], dict[str, str]]:
    """A server's entrypoint, command and environment with TLS: its own entry
    behind one that writes the certificate and key the environment carries."""
    return (
        ["sh", "-c", _TLS_START, "sh", *entrypoint],
        [*command, *TLS_ARGS],
        {**environment, _TLS_CERTIFICATE: certificate.certificate, _TLS_KEY: certificate.key},
    )


def carries_tls(environment: list[str] | None) -> bool:
    """Whether a container's environment (``NAME=value`` items) brings it a certificate."""
    return any(item.startswith(f"{_TLS_CERTIFICATE}=") for item in environment or [])
