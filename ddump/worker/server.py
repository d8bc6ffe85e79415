"""The worker's HTTP server: Tornado's, with a bound on the connections it keeps open.

Without one, a flood of idle connections would use up the worker's file descriptors; then
accept() fails with EMFILE on every turn of the event loop, which spins logging it, and no
capture can start (tcpdump needs pipes too). Past the bound a new connection is closed at
once, before it costs anything but its descriptor for that moment.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import time
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

log = logging.getLogger("ddump.worker")

DEFAULT_MAX_CONNECTIONS = 1000
FDS_PER_CAPTURE = 6  # its client's socket, two pipes, a pidfd, and some room
FDS_KEPT = 64  # the listening sockets, logs, the event loop's own, a tcpdump --version probe
REFUSED_LOG_EVERY_S = 10.0
# A client whose host died, or whose network was cut, while its capture matches nothing would
# keep tcpdump running forever: nothing is written, so nothing fails. Keepalive probes find it
# (KEEPALIVE_IDLE_S + KEEPALIVE_PROBES x KEEPALIVE_INTERVAL_S, about 20 s) and the capture's
# client check sees the dead socket. No TCP_USER_TIMEOUT here: Linux applies it to a client
# that is alive but reads slowly (a zero window) too, and such a client is served, not cut.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 5


def default_max_connections(max_captures: int) -> int:
    """As many as the descriptor limit leaves room for, at most DEFAULT_MAX_CONNECTIONS."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    room = soft - FDS_KEPT - FDS_PER_CAPTURE * max_captures
    return max(1, min(DEFAULT_MAX_CONNECTIONS, room))


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer that closes new connections while `max_connections` are open (set it
    after construction: Tornado's Configurable owns the constructor's arguments)."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    open_connections = 0
    refused = 0
    _refused_logged_at = -REFUSED_LOG_EVERY_S

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if self.open_connections >= self.max_connections:
            stream.close()
            self.refused += 1
            now = time.monotonic()
            if now - self._refused_logged_at >= REFUSED_LOG_EVERY_S:
                self._refused_logged_at = now
                log.warning(
                    "%d open connections, the --max-connections limit: closing new ones "
                    "(%d so far)",
                    self.open_connections,
                    self.refused,
                )
            return
        self.open_connections += 1
        _keepalive(stream.socket)
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        self.open_connections -= 1
        super().on_close(server_conn)


def _keepalive(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # a unix socket has no TCP options
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
