"""Reading an HTTP/1.1 response body as it comes: chunked, by length, or until the close."""

from __future__ import annotations

from collections.abc import Awaitable

from tornado import httputil, iostream

from ddump.cli.chunked import ChunkedDecoder, ChunkedError
from ddump.cli.sources import DataCallback, StreamFailure

READ_SIZE = 256 * 1024


async def read_body(
    stream: iostream.IOStream,
    headers: httputil.HTTPHeaders,
    deliver: DataCallback,
    *,
    until_close_only: bool = False,
) -> None:
    """Deliver the body as it comes. `until_close_only`: a close-delimited body that only a
    clean close ends (a reset or a timeout raises StreamClosedError)."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        await _read_chunked(stream, deliver)
    elif "Content-Length" in headers:
        length = headers["Content-Length"].strip()
        if not (length.isascii() and length.isdigit()):
            raise StreamFailure(f"malformed Content-Length: {length[:40]!r}")
        await _read_length(stream, int(length), deliver)
    else:
        await _read_until_close(stream, deliver, strict=until_close_only)


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


async def _read_until_close(
    stream: iostream.IOStream, deliver: DataCallback, *, strict: bool = False
) -> None:
    while True:
        try:
            chunk = await stream.read_bytes(READ_SIZE, partial=True)
        except iostream.StreamClosedError as exc:
            if strict and exc.real_error is not None:
                raise
            return
        await _pass(deliver(chunk))
