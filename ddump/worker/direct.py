"""Captures whose response body tcpdump writes itself: the worker costs nothing per packet.

Relaying tcpdump's output costs the worker a wakeup, a read and a send for every packet (or
every few: in immediate mode they come one by one), which at everyday rates is several times
tcpdump's own CPU (BENCHMARKS.md, "CPU per packet"). So when the client says it can take it
(request header X-Ddump-Body: direct) and the capture is not a batch one (whose stop cuts
records in the worker), the worker sends the response head at once, hands the connection's
socket to tcpdump as its stdout and from then on only watches: the client hanging up,
tcpdump's exit.

What such a client gives up, and how it gets it back:
- The chunked framing that told a clean end from a cut one: the body ends when the connection
  closes. The worker records how the capture ended (a CaptureEnd) before it closes the socket,
  and the client asks GET /capture/stats?id=... for it.
- The HTTP status of a capture that could not start (a bad filter, no permission): the head
  went out before tcpdump ran, so the same status and message are in that answer.
- The head as the sign that tcpdump listens: tcpdump writes the pcap header once its filter
  is set, just before it says it listens, so the first body bytes are that sign.
Identical captures of such clients do not share one tcpdump (a socket has one reader).
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Mapping

from tornado.ioloop import IOLoop
from tornado.web import RequestHandler

from ddump.worker.registry import CaptureEnd
from ddump.worker.taps import Tap
from ddump.worker.tcpdump import error_lines


async def take_socket(handler: RequestHandler, headers: Mapping[str, str]) -> socket.socket:
    """Send a 200 head with `headers` and take the connection from Tornado: a blocking socket
    (tcpdump's stdout must not be non-blocking) that the caller closes."""
    stream = handler.detach()
    lines = ["HTTP/1.1 200 OK", *(f"{name}: {value}" for name, value in headers.items())]
    await stream.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    sock = stream.socket.dup()  # the same connection, which outlives Tornado's descriptor
    stream.close()
    sock.setblocking(True)
    with contextlib.suppress(OSError):  # not TCP: a unix socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class HangupWatch:
    """Calls `on_hangup` once the client closes or resets the connection.

    The client sends nothing after its request, so the socket becomes readable only when it
    goes; bytes it sends anyway are read and ignored.
    """

    def __init__(self, sock: socket.socket, on_hangup: Callable[[], None]) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._on_hangup: Callable[[], None] | None = on_hangup
        IOLoop.current().add_handler(self._fd, self._readable, IOLoop.READ)

    def _readable(self, fd: int, events: int) -> None:
        try:
            if self._sock.recv(4096, socket.MSG_DONTWAIT):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        on_hangup, self._on_hangup = self._on_hangup, None
        self.stop()
        if on_hangup is not None:
            on_hangup()

    def stop(self) -> None:
        if self._fd != -1:
            IOLoop.current().remove_handler(self._fd)
            self._fd = -1


def end_of(tap: Tap) -> CaptureEnd:
    """How tcpdump's stream ended, once it exited: clean, unless it died on its own (the stream
    lacks what it would have written) or was killed (possibly in the middle of a record)."""
    code, asked_to_stop = tap.returncode, tap.capture.stop_reason is not None
    if code == -signal.SIGKILL:
        return CaptureEnd("failed", "tcpdump did not stop when asked and was killed")
    if not asked_to_stop and code not in (0, None):
        detail = error_lines(tap.stderr_text).replace("\n", "; ")
        how = f"exit status {code}" if code > 0 else f"signal {-code}"
        return CaptureEnd("failed", f"tcpdump ended with {how}: {detail or 'no message'}")
    return CaptureEnd("clean")
