"""One target's capture stream: an HTTP(S) GET whose chunked body is a live pcap.

Tornado's HTTP client is built for finite bodies: a 100 MB body limit even when streaming, a
20 s request timeout, queueing after `max_clients`, no way to cancel an idle request, and (since
Tornado 6.5) chunks coalesced up to `chunk_size` before they are delivered, which would hold a
quiet stream's packets indefinitely. A live capture needs the opposite, so this module speaks
the little HTTP/1.1 it needs over a Tornado IOStream: every chunk is handed on as soon as it
arrives, the next read waits until the consumer is ready (backpressure), and `close()` works at
any moment, which makes the worker stop its tcpdump.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit, urlunsplit

from tornado import httputil, iostream
from tornado.tcpclient import TCPClient

from ddump import __version__
from ddump.cli.chunked import ChunkedDecoder, ChunkedError
from ddump.cli.sources import DataCallback, Opened, OpenedCallback, StreamFailure
from ddump.pcapng import parse_interfaces_header
from ddump.protocol import (
    BATCH_PARAM,
    CAPTURE_HEADER,
    CLOCK_HEADER,
    INTERFACES_HEADER,
    PCAP_CONTENT_TYPE,
    STATS_PATH,
)
from ddump.targets import Target

ERROR_BODY_LIMIT = 4096
ERROR_BODY_WAIT_S = 2.0  # an error page that never ends must not hold the message back
READ_SIZE = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024
# The worker answers once tcpdump is listening, which takes a moment after the connection.
HEADER_GRACE_S = 10.0
_CAPTURE_ID = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class _Response:
    code: int = 0
    reason: str = ""
    error_body: bytes = b""


class CaptureStream:
    """Connects to one target and feeds its body to callbacks until it ends or is closed."""

    def __init__(
        self,
        target: Target,
        ssl_context: ssl.SSLContext | None,
        connect_timeout_s: float,
    ) -> None:
        self.target = target
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self._stream: iostream.IOStream | None = None
        self._connecting: asyncio.Future[iostream.IOStream] | None = None
        self._closing = False

    async def run(self, on_opened: OpenedCallback, on_data: DataCallback) -> None:
        """Stream the capture; return when the worker ends it, raise StreamFailure otherwise.

        Returns quietly too when `close()` was called.
        """
        parts = urlsplit(self.target.url)
        tls = parts.scheme == "https"
        # RFC 6874: an IPv6 zone id's "%" is written "%25" in the URL (fe80::1%25eth0).
        host = unquote(parts.hostname or "")
        stream = await self._connect(host, parts.port or 0, tls)
        if stream is None:
            return
        response = _Response()
        try:
            sent_ns = time.time_ns()
            await stream.write(self._request(_host_header(parts.netloc)))
            await self._read_response(stream, response, sent_ns, on_opened, on_data)
        except iostream.StreamClosedError as exc:
            if self._closing:
                return
            raise StreamFailure(_closed_reason(exc, response, tls)) from None
        except TimeoutError:
            raise StreamFailure(
                f"no response within {self.connect_timeout_s + HEADER_GRACE_S:g} s"
                + (" (is the target https?)" if not tls else "")
            ) from None
        finally:
            stream.close()
        if response.code not in (0, 200):
            raise StreamFailure(_http_error(response))
        if self._closing:
            return

    def close(self) -> None:
        """Stop streaming now (the worker sees the connection close and stops tcpdump)."""
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._stream is not None:
            self._stream.close()

    async def _connect(self, host: str, port: int, tls: bool) -> iostream.IOStream | None:
        self._connecting = asyncio.ensure_future(
            TCPClient().connect(
                host,
                port,
                ssl_options=self.ssl_context if tls else None,
                timeout=self.connect_timeout_s,
                max_buffer_size=4 * READ_SIZE + MAX_HEADER_BYTES,
            )
        )
        try:
            stream = await self._connecting
        except asyncio.CancelledError:
            if self._closing:
                return None
            raise
        except ssl.SSLCertVerificationError as exc:
            raise StreamFailure(f"TLS certificate not trusted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise StreamFailure(f"TLS handshake failed: {_ssl_reason(exc)}") from None
        except TimeoutError:
            hint = "; with https, is the target plain http?" if tls else ""
            raise StreamFailure(
                f"no connection within {self.connect_timeout_s:g} s (--connect-timeout{hint})"
            ) from None
        except OSError as exc:
            raise StreamFailure(_connect_error(exc)) from None
        if self._closing:
            stream.close()
            return None
        stream.set_nodelay(True)
        self._stream = stream
        return stream

    def _request(self, host_header: str) -> bytes:
        lines = [
            f"GET {_path_and_query(self.target.url)} HTTP/1.1",
            f"Host: {host_header}",
            f"User-Agent: ddump/{__version__}",
            f"Accept: {PCAP_CONTENT_TYPE}",
            "Connection: close",
        ]
        if self.target.username is not None:
            secret = f"{self.target.username}:{self.target.password or ''}".encode()
            lines.append("Authorization: Basic " + base64.b64encode(secret).decode("ascii"))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    async def _read_response(
        self,
        stream: iostream.IOStream,
        response: _Response,
        sent_ns: int,
        on_opened: OpenedCallback,
        on_data: DataCallback,
    ) -> None:
        head = await asyncio.wait_for(
            stream.read_until_regex(b"\r?\n\r?\n", max_bytes=MAX_HEADER_BYTES),
            self.connect_timeout_s + HEADER_GRACE_S,
        )
        received_ns = time.time_ns()
        first, _, rest = head.decode("latin-1").partition("\n")
        try:
            start = httputil.parse_response_start_line(first.strip())
        except httputil.HTTPInputError:
            raise StreamFailure(f"not an HTTP response: {first.strip()[:80]!r}") from None
        try:
            headers = httputil.HTTPHeaders.parse(rest)
        except httputil.HTTPInputError as exc:
            raise StreamFailure(f"malformed response header: {exc}") from None
        response.code, response.reason = start.code, start.reason
        if response.code == 200:
            clock = headers.get(CLOCK_HEADER, "")
            worker_ns = int(clock) if clock.isascii() and clock.isdigit() else None
            on_opened(
                Opened(
                    None if worker_ns is None else worker_ns - received_ns,
                    worker_ns,
                    parse_interfaces_header(headers.get(INTERFACES_HEADER, "")),
                    received_ns - sent_ns,
                    _capture_id(headers.get(CAPTURE_HEADER, "")),
                )
            )
            await _read_body(stream, headers, on_data)
        else:

            def keep(chunk: bytes) -> None:
                response.error_body += chunk[: ERROR_BODY_LIMIT - len(response.error_body)]
                if len(response.error_body) >= ERROR_BODY_LIMIT:
                    raise _EnoughOfIt

            with contextlib.suppress(
                _EnoughOfIt, TimeoutError, iostream.StreamClosedError, StreamFailure
            ):
                await asyncio.wait_for(_read_body(stream, headers, keep), ERROR_BODY_WAIT_S)


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


async def _read_body(
    stream: iostream.IOStream, headers: httputil.HTTPHeaders, deliver: DataCallback
) -> None:
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        await _read_chunked(stream, deliver)
    elif "Content-Length" in headers:
        length = headers["Content-Length"].strip()
        if not (length.isascii() and length.isdigit()):
            raise StreamFailure(f"malformed Content-Length: {length[:40]!r}")
        await _read_length(stream, int(length), deliver)
    else:
        await _read_until_close(stream, deliver)


async def _pass(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


async def _read_chunked(stream: iostream.IOStream, deliver: DataCallback) -> None:
    decoder = ChunkedDecoder()
    while not decoder.done:
        data = await stream.read_bytes(READ_SIZE, partial=True)
        try:
            payload = decoder.feed(data)
        except ChunkedError as exc:
            if exc.payload:  # the good bytes before the fault still count
                await _pass(deliver(exc.payload))
            raise StreamFailure(str(exc)) from None
        if payload:
            await _pass(deliver(payload))


async def _read_length(stream: iostream.IOStream, size: int, deliver: DataCallback) -> None:
    while size > 0:
        chunk = await stream.read_bytes(min(size, READ_SIZE), partial=True)
        size -= len(chunk)
        await _pass(deliver(chunk))


async def _read_until_close(stream: iostream.IOStream, deliver: DataCallback) -> None:
    while True:
        try:
            chunk = await stream.read_bytes(READ_SIZE, partial=True)
        except iostream.StreamClosedError:
            return
        await _pass(deliver(chunk))


def _path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _http_error(response: _Response) -> str:
    text = response.error_body.decode("utf-8", "replace").strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    html = first.startswith("<")
    if html:
        first = _html_title(text) or first
    status = f"HTTP {response.code} {response.reason}".rstrip()
    parts = [status]
    hint = _hint(response.code, text, html)
    if hint:
        parts.append(hint)
    if first:
        parts.append(first[:300])
    return ": ".join(parts)


def _hint(code: int, text: str, html: bool) -> str:
    # nginx answers TLS-client problems with a 400 HTML page: say what to fix on our side.
    if "SSL certificate" in text:
        return "the proxy wants a client certificate it trusts: give --cert and --key"
    if "plain HTTP request was sent to HTTPS port" in text:
        return "the target speaks https: use https://"
    if code == 400 and f"unknown parameter '{BATCH_PARAM}'" in text:
        return "this worker is older than batch captures: upgrade it, or leave out --batch"
    if code == 400:
        return "the server refused the request" if html else "the worker refused the request"
    return {
        401: "authentication failed: check the user and password",
        403: "forbidden: the proxy refused this client (certificate or address)",
        404: "not found: is the path right (default /capture)?",
        502: "the proxy could not reach the worker (is ddump-worker running?)",
        503: "the worker cannot capture now",
    }.get(code, "")


def _html_title(text: str) -> str:
    lower = text.lower()
    start, end = lower.find("<title>"), lower.find("</title>")
    if start == -1 or end <= start:
        return ""
    return text[start + len("<title>") : end].strip()


def _connect_error(exc: OSError) -> str:
    if isinstance(exc, iostream.StreamClosedError) and isinstance(exc.real_error, OSError):
        exc = exc.real_error
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is ddump-worker running and listening on that port?)"
    name = type(exc).__name__
    if name == "gaierror" or "Name or service not known" in str(exc):
        return f"cannot resolve host name ({exc.strerror or exc})"
    return f"cannot connect: {exc.strerror or exc}"


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or str(exc)
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return f"{reason} (does the server require a client certificate? use --cert and --key)"
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
        return f"{reason} (the server rejected our client certificate)"
    if "WRONG_VERSION_NUMBER" in reason:
        return f"{reason} (is the target plain http?)"
    return reason


def _closed_reason(exc: iostream.StreamClosedError, response: _Response, tls: bool) -> str:
    real = exc.real_error
    if isinstance(real, ssl.SSLError):
        return f"TLS failure: {_ssl_reason(real)}"
    if response.code == 0:
        hint = (
            " (TLS: the server may require a client certificate, --cert/--key, or refuse ours)"
            if tls
            else ""
        )
        return "connection closed before any response" + (f" ({real})" if real else hint)
    return "connection lost mid-stream" + (f" ({real})" if real else "")
