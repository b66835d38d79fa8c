"""With authentication off (``dbprov serve --no-auth``), only this machine, by a loopback name.

Without tokens, the one thing between a caller and every database is that the
service listens on a loopback address. A web page the local user opens can get
past that: its own host name, resolved again, may lead to 127.0.0.1 (DNS
rebinding), and its scripts then talk to the service as their own origin, reads
included. The browser still sends the name it resolved as the Host header, so
every request, whatever it asks for, must name this machine as only this
machine can: ``localhost``, ``127.0.0.1`` or ``[::1]``, with any port. The peer
must be a loopback address too, should the process have been handed a socket
on another address (gunicorn adopts sockets a service manager passes it,
whatever ``--host`` said): there, any client can send any Host.
"""

from __future__ import annotations

import ipaddress
import re

from flask import Flask, current_app, request

from ..errors import NotLocal
from .problems import from_dbprov_error

# A Host header or an Origin's host and port.
_LOOPBACK_HOST = re.compile(r"(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?", re.IGNORECASE)


def is_loopback_host(host: str) -> bool:
    return _LOOPBACK_HOST.fullmatch(host) is not None


def _is_loopback_peer(address: str | None) -> bool:
    try:
        peer = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return peer.is_loopback


def init_app(app: Flask) -> None:
    @app.before_request
    def _only_this_machine():
        if current_app.extensions["dbprov"].auth_required:
            return None
        if not _is_loopback_peer(request.remote_addr):
            error = NotLocal(
                "with authentication off, the service answers this machine only: "
                f"the request came from {request.remote_addr or 'an unknown address'}"
            )
        elif not is_loopback_host(request.host):
            error = NotLocal(
                f"with authentication off, the service answers only to localhost, 127.0.0.1 or [::1] "
                f"as the host, not {request.host or 'none'}: open it by one of those names"
            )
        else:
            return None
        # Answered here, before any view or its blueprint's error page: the
        # same problem document for the API, the page, the docs and health.
        return from_dbprov_error(error)
