"""The worker's HTTP server: Tornado's, with a bound on the connections it keeps open.

Without one, a flood of idle connections would use up the worker's file descriptors; then
accept() fails with EMFILE on every turn of the event loop, which spins logging it, and no
capture can start (tcpdump needs pipes too). Past the bound a new connection is closed at
once, before it costs anything but its descriptor for that moment.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

log = logging.getLogger("ddump.worker")

DEFAULT_MAX_CONNECTIONS = 1000
FDS_PER_CAPTURE = 6  # its client's socket, two pipes, a pidfd, and some room
FDS_KEPT = 64  # the listening sockets, logs, the event loop's own, a tcpdump --version probe
REFUSED_LOG_EVERY_S = 10.0


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
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        self.open_connections -= 1
        super().on_close(server_conn)
