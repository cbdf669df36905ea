"""Listening sockets shared by the relay, the client tunnel and the status listener.

``bind_listener`` turns an ``Endpoint`` into a bound, listening, non-blocking socket (TCP with
optional SO_REUSEPORT, or a unix socket, replacing a stale socket file left by an earlier
run); ``bound_port`` reports the TCP port actually bound, which matters with port 0.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from proxy.config import Endpoint


def bind_listener(
    endpoint: Endpoint, reuse_port: bool = False, backlog: int = 1024
) -> socket.socket:
    """A listening, non-blocking socket for ``endpoint``."""
    if endpoint.path is not None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(endpoint.path).st_mode):
                os.unlink(endpoint.path)  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(endpoint.path)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
    else:
        assert endpoint.port is not None
        host = endpoint.host or ""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server(
            (host, endpoint.port), family=family, backlog=backlog, reuse_port=reuse_port
        )
    sock.setblocking(False)
    return sock


def bound_port(sock: socket.socket | None) -> int | None:
    """The TCP port ``sock`` is bound to, or None for unix sockets and no socket."""
    if sock is None or sock.family == socket.AF_UNIX:
        return None
    return int(sock.getsockname()[1])
