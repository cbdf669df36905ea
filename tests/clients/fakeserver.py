"""A fake beanstalkd for measuring client libraries: answers every command with one chosen
reply line (reading a ``put``'s body by its byte count, so the stream stays framed), except
``stats``, answered with a small valid body whose ``pid`` is ``FAKE_PID`` and whose ``uptime``
is the number of commands the connection sent before it. A driver that sends ``stats`` after an
operation and gets ``uptime >= 1`` back is still in sync on the same connection. Used by
scripts/denial_matrix.py and tests/test_client_libraries.py.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading

FAKE_PID = 4242


class _Handler(socketserver.StreamRequestHandler):
    server: FakeServer

    def handle(self) -> None:
        self.server.track(self.request, True)
        seen = 0
        try:
            while line := self.rfile.readline(300):
                words = line.rstrip(b"\r\n").split(b" ")
                if words[0] == b"put" and len(words) == 5 and words[4].isdigit():
                    self.rfile.read(int(words[4]) + 2)  # the body and its CRLF
                if words[0] == b"quit":
                    return
                if words[0] == b"stats":
                    body = b"---\npid: %d\nuptime: %d\n" % (FAKE_PID, seen)
                    self.wfile.write(b"OK %d\r\n%s\r\n" % (len(body), body))
                else:
                    self.wfile.write(self.server.reply.encode() + b"\r\n")
                seen += 1
        except OSError:
            pass
        finally:
            self.server.track(self.request, False)


class FakeServer(socketserver.ThreadingTCPServer):
    """Answers ``reply`` to every command but ``stats`` (see the module docstring)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, reply: str = "NOT_PERMITTED") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.reply = reply
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(sock)

    def drop_all(self) -> None:
        """Close every client connection (unblocks a library that hung waiting)."""
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.drop_all()
        self.server_close()
