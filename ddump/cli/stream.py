"""One target's capture stream: an HTTP(S) GET whose body is a live pcap.

Tornado's HTTP client is built for finite bodies: a 100 MB body limit even when streaming, a
20 s request timeout, queueing after `max_clients`, no way to cancel an idle request, and (since
Tornado 6.5) chunks coalesced up to `chunk_size` before they are delivered, which would hold a
quiet stream's packets indefinitely. A live capture needs the opposite, so this module speaks
the little HTTP/1.1 it needs on a socket read straight from the event loop
(ddump/cli/http_conn.py, ddump/cli/http_wire.py): every read is handed on as soon as it
arrives, the next read waits until the consumer is ready (backpressure), and `close()` works at
any moment, which makes the worker stop its tcpdump.

The request offers to take a body tcpdump writes itself (X-Ddump-Body: direct, see
ddump/worker/direct.py): the worker then relays nothing, the body ends when the connection
closes, and the worker is asked how the capture ended (GET /capture/stats).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import re
import socket
import ssl
import time
from collections.abc import Awaitable
from dataclasses import replace
from http.client import responses
from urllib.parse import unquote, urlsplit, urlunsplit

from ddump import __version__
from ddump.cli.http_conn import HttpConnection, open_connection
from ddump.cli.http_errors import (
    Response,
    closed_reason,
    connect_error,
    http_error,
    ssl_reason,
)
from ddump.cli.http_wire import (
    ConnectionClosed,
    Head,
    HeadTooLarge,
    body_framing,
    parse_head,
)
from ddump.cli.sources import (
    DataCallback,
    Opened,
    OpenedCallback,
    StreamFailure,
    StreamStalled,
)
from ddump.cli.unread import UnreadSlot
from ddump.pcapng import parse_interfaces_header
from ddump.protocol import (
    BODY_DIRECT,
    BODY_HEADER,
    CAPTURE_HEADER,
    CLOCK_HEADER,
    INTERFACES_HEADER,
    PCAP_CONTENT_TYPE,
    STATS_PATH,
)
from ddump.targets import Target

ERROR_BODY_LIMIT = 4096
ERROR_BODY_WAIT_S = 2.0  # an error page that never ends must not hold the message back
MAX_HEADER_BYTES = 64 * 1024
# The worker answers once tcpdump is listening, which takes a moment after the connection.
HEADER_GRACE_S = 10.0
# A direct capture's tcpdump starts after the head: the worker waits up to 60 s for it on a
# busy host (6 times its 10 s limit of CPU time, ddump/worker/start.py) and then says why.
DIRECT_START_GRACE_S = 70.0
_CAPTURE_ID = re.compile(r"[A-Za-z0-9_-]+")
# A dead peer or a cut link must show within seconds, also while the filter matches nothing.
# The kernel probes a connection idle for KEEPALIVE_IDLE_S; the worker's kernel answers while
# its host is up and reachable, so a quiet capture is never taken for a dead one. Once nothing
# has come back for STALL_TIMEOUT_S (TCP_USER_TIMEOUT), the connection fails with ETIMEDOUT.
# We send nothing after the request, so the timeout never cuts a peer that is slow to read.
KEEPALIVE_IDLE_S = 2
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_PROBES = 3
STALL_TIMEOUT_S = 5
STATS_TIMEOUT_S = 2.0  # for the worker to say how a direct stream ended


class CaptureStream:
    """Connects to one target and feeds its body to callbacks until it ends or is closed."""

    def __init__(
        self,
        target: Target,
        ssl_context: ssl.SSLContext | None,
        connect_timeout_s: float,
        unread: UnreadSlot | None = None,
    ) -> None:
        """`unread`: where the capture's socket is shown to the session's probe of unread
        bytes (ddump/cli/unread.py)."""
        self.target = target
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.unread = unread
        self._conn: HttpConnection | None = None
        self._connecting: asyncio.Future[HttpConnection] | None = None
        self._closing = False
        self.answered = False  # a 200 head came (before tcpdump started, if direct)
        # (capture id, the worker's answer) on how a direct capture ended: its final counts
        self.final_stats: tuple[str, dict[str, object]] | None = None
        self.quick_retry = False  # connect_timeout_s was shortened: see retry_quickly()

    def retry_quickly(self, timeout_s: float) -> None:
        """Connect within at most `timeout_s`: the target was capturing moments ago."""
        self.connect_timeout_s = min(self.connect_timeout_s, timeout_s)
        self.quick_retry = True

    async def run(self, on_opened: OpenedCallback, on_data: DataCallback) -> None:
        """Stream the capture; return when the worker ends it, raise StreamFailure otherwise.

        Returns quietly too when `close()` was called.
        """
        parts = urlsplit(self.target.url)
        tls = parts.scheme == "https"
        # RFC 6874: an IPv6 zone id's "%" is written "%25" in the URL (fe80::1%25eth0).
        host = unquote(parts.hostname or "")
        conn = await self._connect(host, parts.port or 0, tls)
        if conn is None:
            return
        response = Response()
        try:
            sent_ns = time.time_ns()
            await conn.send(self._request(_host_header(parts.netloc)))
            await self._read_response(conn, response, sent_ns, on_opened, on_data)
        except ConnectionClosed as exc:
            if self._closing:
                return
            if isinstance(exc.error, OSError) and exc.error.errno == errno.ETIMEDOUT:
                raise StreamStalled(
                    f"connection stalled: nothing came back from the worker's host for "
                    f"{STALL_TIMEOUT_S} s (host down, or the network to it cut)",
                    STALL_TIMEOUT_S * 10**9,
                ) from None
            raise StreamFailure(closed_reason(exc.error, response, tls)) from None
        except TimeoutError:
            raise StreamFailure(
                f"no response within {self.connect_timeout_s + HEADER_GRACE_S:g} s"
                + (" (is the target https?)" if not tls else "")
            ) from None
        except HeadTooLarge:
            raise StreamFailure(
                f"the response head is larger than {MAX_HEADER_BYTES // 1024} KiB"
            ) from None
        finally:
            conn.close()
        if response.code not in (0, 200):
            raise StreamFailure(http_error(response))
        if self._closing:
            return

    @property
    def connected(self) -> bool:
        """Whether the TCP (and TLS) connection was made."""
        return self._conn is not None

    def close(self) -> None:
        """Stop streaming now (the worker sees the connection close and stops tcpdump)."""
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.close()

    async def _connect(self, host: str, port: int, tls: bool) -> HttpConnection | None:
        connecting = self._connecting = asyncio.ensure_future(
            asyncio.wait_for(
                open_connection(host, port, self.ssl_context if tls else None, MAX_HEADER_BYTES),
                self.connect_timeout_s,
            )
        )
        try:
            conn = await connecting
        except asyncio.CancelledError:
            if self._closing:
                return None
            raise
        except ssl.SSLCertVerificationError as exc:
            raise StreamFailure(f"TLS certificate not trusted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise StreamFailure(f"TLS handshake failed: {ssl_reason(exc)}") from None
        except TimeoutError:
            hint = "; with https, is the target plain http?" if tls else ""
            why = "a quick retry" if self.quick_retry else "--connect-timeout"
            raise StreamFailure(
                f"no connection within {self.connect_timeout_s:g} s ({why}{hint})"
            ) from None
        except OSError as exc:
            raise StreamFailure(connect_error(exc)) from None
        if self._closing:
            conn.close()
            return None
        _detect_stalls(conn.sock)
        self._conn = conn
        return conn

    def _request(self, host_header: str) -> bytes:
        lines = [
            f"GET {_path_and_query(self.target.url)} HTTP/1.1",
            f"Host: {host_header}",
            f"User-Agent: ddump/{__version__}",
            f"Accept: {PCAP_CONTENT_TYPE}",
            f"{BODY_HEADER}: {BODY_DIRECT}",  # tcpdump may write the body itself: see below
            "Connection: close",
        ]
        if self.target.username is not None:
            secret = f"{self.target.username}:{self.target.password or ''}".encode()
            lines.append("Authorization: Basic " + base64.b64encode(secret).decode("ascii"))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    async def _read_response(
        self,
        conn: HttpConnection,
        response: Response,
        sent_ns: int,
        on_opened: OpenedCallback,
        on_data: DataCallback,
    ) -> None:
        raw = await asyncio.wait_for(conn.head(), self.connect_timeout_s + HEADER_GRACE_S)
        received_ns = time.time_ns()
        head = parse_head(raw)
        response.code, response.reason = head.code, head.reason
        if response.code == 200:
            self.answered = True
            clock = head.get(CLOCK_HEADER)
            worker_ns = int(clock) if clock.isascii() and clock.isdigit() else None
            opened = Opened(
                None if worker_ns is None else worker_ns - received_ns,
                worker_ns,
                parse_interfaces_header(head.get(INTERFACES_HEADER)),
                received_ns - sent_ns,
                _capture_id(head.get(CAPTURE_HEADER)),
            )
            if head.get(BODY_HEADER).strip().lower() == BODY_DIRECT:
                await self._read_direct(conn, head, opened, on_opened, on_data)
            else:
                on_opened(opened)
                await conn.body(body_framing(head), on_data, self.unread)
        else:

            def keep(chunk: bytes) -> None:
                response.error_body += chunk[: ERROR_BODY_LIMIT - len(response.error_body)]
                if len(response.error_body) >= ERROR_BODY_LIMIT:
                    raise _EnoughOfIt

            with contextlib.suppress(_EnoughOfIt, TimeoutError, ConnectionClosed, StreamFailure):
                await asyncio.wait_for(conn.body(body_framing(head), keep), ERROR_BODY_WAIT_S)

    async def _read_direct(
        self,
        conn: HttpConnection,
        head: Head,
        opened: Opened,
        on_opened: OpenedCallback,
        on_data: DataCallback,
    ) -> None:
        """A body tcpdump writes itself (see ddump/worker/direct.py): the worker sent its head
        before tcpdump ran, so the capture is open once the pcap header comes, and the body
        ends when the connection closes, however the capture ended: the worker says how."""
        if opened.capture_id is None:
            raise StreamFailure(f"the worker's direct stream has no {CAPTURE_HEADER} header")
        started = False

        def deliver(data: bytes) -> Awaitable[None] | None:
            nonlocal started
            started = True
            on_opened(opened)
            conn.deliver = on_data  # from now on, no call of this per read
            return on_data(data)

        grace = self.connect_timeout_s + DIRECT_START_GRACE_S
        timed_out = False

        def give_up() -> None:  # the worker gives up on tcpdump sooner: it is stuck itself
            nonlocal timed_out
            if not started:
                timed_out = True
                conn.close()

        # Nothing it sends can be older than now: the merge need not wait for its start.
        on_opened(replace(opened, started=False))
        late = asyncio.get_running_loop().call_later(grace, give_up)
        try:
            await conn.body(body_framing(head, until_close_only=True), deliver, self.unread)
        finally:
            late.cancel()
        if timed_out:
            raise StreamFailure(f"the capture did not start within {grace:g} s")
        if not self._closing:
            await self._direct_end(opened.capture_id)

    async def _direct_end(self, capture_id: str) -> None:
        """Return if the worker says the capture ended cleanly; raise StreamFailure if not."""
        timeout = max(STATS_TIMEOUT_S, self.connect_timeout_s)
        try:
            answer = await fetch_stats(
                stats_target(self.target, capture_id), self.ssl_context, timeout
            )
        except (StreamFailure, TimeoutError) as exc:
            raise StreamFailure(
                "connection lost mid-stream (the worker did not say how the capture ended: "
                f"{exc or 'no answer in time'})"
            ) from None
        if answer.get("running") is False:  # tcpdump's exit counts: not to be asked again
            self.final_stats = (capture_id, answer)
        how, error = answer.get("ended"), str(answer.get("error") or "no message")
        if how == "clean":
            return
        if how == "refused":
            status = answer.get("status")
            code = status if isinstance(status, int) and 400 <= status < 600 else 503
            reason = responses.get(code, "")
            raise StreamFailure(http_error(Response(code, reason, error.encode())))
        if how == "failed":
            raise StreamFailure(f"the capture failed on the worker: {error}")
        raise StreamFailure("the stream ended while the worker says the capture goes on")


def _detect_stalls(sock: socket.socket) -> None:
    """Keepalive probes and a user timeout: see STALL_TIMEOUT_S."""
    with contextlib.suppress(OSError, AttributeError):  # not TCP (a test's unix socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, STALL_TIMEOUT_S * 1000)


def _host_header(netloc: str) -> str:
    """host:port for the Host header, without an IPv6 zone id: it names an interface of this
    host, which means nothing to the server (curl leaves it out too)."""
    return re.sub(r"%25[^\]]*\]", "]", netloc.rsplit("@", 1)[-1])


def _capture_id(value: str) -> str | None:
    """The worker's name for the capture, if it is one (URL-safe, short)."""
    value = value.strip()
    return value if 0 < len(value) <= 64 and _CAPTURE_ID.fullmatch(value) else None


def stats_target(target: Target, capture_id: str) -> Target:
    """The same worker (credentials, TLS files), asked for one capture's statistics."""
    parts = urlsplit(target.url)
    path = parts.path.rstrip("/") + STATS_PATH
    return replace(target, url=urlunsplit(parts._replace(path=path, query=f"id={capture_id}")))


async def fetch_stats(
    target: Target, ssl_context: ssl.SSLContext | None, timeout_s: float
) -> dict[str, object]:
    """GET a capture's statistics (see stats_target); StreamFailure or TimeoutError if not."""
    body: list[bytes] = []

    def keep(chunk: bytes) -> None:
        body.append(chunk)
        if sum(map(len, body)) > MAX_HEADER_BYTES:
            raise StreamFailure("statistics too large")

    stream = CaptureStream(target, ssl_context, timeout_s)
    await asyncio.wait_for(stream.run(lambda _: None, keep), timeout_s)
    try:
        stats = json.loads(b"".join(body))
    except ValueError:
        raise StreamFailure("statistics are not JSON") from None
    if not isinstance(stats, dict):
        raise StreamFailure("statistics are not a JSON object")
    return stats


class _EnoughOfIt(Exception):
    """The first few KiB of an error page say all we will show."""


def _path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
