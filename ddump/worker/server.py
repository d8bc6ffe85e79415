"""The worker's HTTP server: Tornado's, with a bound on the connections it keeps open, and
optionally on the addresses they may come from (--allow).

Without a bound, a flood of idle connections would use up the worker's file descriptors; then
accept() fails with EMFILE on every turn of the event loop, which spins logging it, and no
capture can start (tcpdump needs pipes too). Past the bound a new connection is closed at
once, before it costs anything but its descriptor for that moment. A connection from an
address --allow does not list is closed the same way, before a byte of it is read.
"""

from __future__ import annotations

import resource
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from ddump.worker.listen import Network, client_allowed
from ddump.worker.refusals import RefusalLog

DEFAULT_MAX_CONNECTIONS = 1000
FDS_PER_CAPTURE = 6  # its client's socket, two pipes, a pidfd, and some room
FDS_KEPT = 64  # the listening sockets, logs, the event loop's own, a tcpdump --version probe


def default_max_connections(max_captures: int) -> int:
    """As many as the descriptor limit leaves room for, at most DEFAULT_MAX_CONNECTIONS."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    room = soft - FDS_KEPT - FDS_PER_CAPTURE * max_captures
    return max(1, min(DEFAULT_MAX_CONNECTIONS, room))


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer that closes new connections while `max_connections` are open, and those
    from outside `allow` when it is not empty (set these after construction: Tornado's
    Configurable owns the constructor's arguments)."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    allow: tuple[Network, ...] = ()
    refusals = RefusalLog()
    open_connections = 0
    refused = 0

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        peer = str(address[0]) if isinstance(address, tuple) and address else ""
        if self.allow and not client_allowed(peer, self.allow):
            stream.close()
            self.refused += 1
            self.refusals.refused(
                f"connection from {peer} closed: not in --allow "
                + " ".join(str(network) for network in self.allow)
            )
            return
        if self.open_connections >= self.max_connections:
            stream.close()
            self.refused += 1
            self.refusals.refused(
                f"connection from {peer or 'unix'} closed: {self.open_connections} open "
                "connections, the --max-connections limit: closing new ones "
                f"({self.refused} so far)"
            )
            return
        self.open_connections += 1
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        self.open_connections -= 1
        super().on_close(server_conn)
