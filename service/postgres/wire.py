"""Just enough of PostgreSQL's wire protocol to turn a client away properly:
with an ``ErrorResponse`` that its driver shows, not a reset socket.

Used where the service holds a database's port itself (a sleeping database)
and the server behind it cannot be had.
"""

from __future__ import annotations

import socket
import struct

# The codes a first packet may carry instead of a protocol version.
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
# A startup packet is small; anything larger is not a PostgreSQL client.
_MAX_STARTUP = 10_000


def refuse(client: socket.socket, message: str, code: str = "57P03", timeout: float = 5.0) -> None:
    """Read the client's startup, answer ``message`` as a FATAL error, and close.

    An SSL or GSSAPI encryption request is declined first ('N'): since
    CVE-2024-10977 libpq shows no error sent before encryption is settled,
    so the error goes after the startup packet that follows, in the clear.
    A client that insists on TLS gives up at the 'N' with its own message;
    the reason is then in the database's events. 57P03 is
    ``cannot_connect_now``, what a server that is starting up answers.
    """
    client.settimeout(timeout)
    try:
        for _ in range(3):
            code_or_version = _read_startup(client)
            if code_or_version == _CANCEL_REQUEST:
                return  # nothing to cancel, and a cancel gets no answer
            if code_or_version in (_SSL_REQUEST, _GSSENC_REQUEST):
                client.sendall(b"N")
                continue
            client.sendall(error_response(message, code))
            return
    except (OSError, ValueError):
        pass  # gone, or not a PostgreSQL client: nothing to tell it
    finally:
        client.close()


def is_first_packet(head: bytes) -> bool:
    """Whether ``head``, a connection's first 8 bytes, begin what a PostgreSQL
    client sends first: a startup packet of protocol 3, or an SSL, GSSAPI
    encryption or cancel request."""
    length, code = struct.unpack("!II", head)
    return 8 <= length <= _MAX_STARTUP and (
        code >> 16 == 3 or code in (_SSL_REQUEST, _GSSENC_REQUEST, _CANCEL_REQUEST)
    )


def error_response(message: str, code: str) -> bytes:
    fields = b"".join(
        kind + value.encode("utf-8", "replace").replace(b"\0", b"") + b"\0"
        for kind, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    ) + b"\0"
    return b"E" + struct.pack("!I", 4 + len(fields)) + fields


def _read_startup(client: socket.socket) -> int:
    """The first packet's length-prefixed body read; its code or protocol version."""
    (length,) = struct.unpack("!I", _read(client, 4))
    if not 8 <= length <= _MAX_STARTUP:
        raise ValueError("not a startup packet")
    body = _read(client, length - 4)
    return struct.unpack("!I", body[:4])[0]


def _read(client: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = client.recv(size - len(data))
        if not chunk:
            raise ValueError("closed")
        data += chunk
    return data
