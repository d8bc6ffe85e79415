"""The worker's HTTP server: Tornado's, with a bound on the connections it keeps open, and
optionally on the addresses they may come from (--allow).

Without a bound, a flood of idle connections would use up the worker's file descriptors; then
accept() fails with EMFILE on every turn of the event loop, which spins logging it, and no
capture can start (tcpdump needs pipes too). Past the bound a new connection is closed at
once, before it costs anything but its descriptor for that moment. A connection from an
address --allow does not list is closed the same way, before a byte of it is read.
"""

from __future__ import annotations

import contextlib
import resource
import socket
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from ddump.worker.listen import Network, client_allowed
from ddump.worker.refusals import RefusalLog

DEFAULT_MAX_CONNECTIONS = 1000
FDS_PER_CAPTURE = 6  # its client's socket, two pipes, a pidfd, and some room
FDS_KEPT = 64  # the listening sockets, logs, the event loop's own, a tcpdump --version probe
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
