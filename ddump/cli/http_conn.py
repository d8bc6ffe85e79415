"""One HTTP/1.1 response on a non-blocking socket, its body handed on from the event loop.

A live capture is many small reads for hours, so a read here is the least the event loop
allows: the socket's reader callback reads into a buffer every connection shares and hands
the bytes on, with no future, task step or transport in between. While the consumer is not
ready (the output is full, or the stream waits for the pacer's next turn: ddump/cli/pacer.py),
the socket is not watched at all: what comes meanwhile waits in the kernel's socket buffer, and
the consumer's readiness reads it directly. Watching starts again only once a read finds
nothing: a busy stream costs one read a turn and no event-loop bookkeeping. Measured against
a Tornado IOStream and an asyncio transport in BENCHMARKS.md ("CPU per packet").

TLS is the ssl module's own socket: its handshake and reads are driven from the same callbacks.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from ddump.cli.chunked import ChunkedError
from ddump.cli.http_wire import ConnectionClosed, Framing, HeadTooLarge, find_head_end
from ddump.cli.sources import DataCallback, StreamFailure
from ddump.cli.unread import UnreadSlot

# Every connection reads into this one buffer, and a read's bytes are copied out at once (the
# loop runs one callback at a time): a read of a few hundred bytes then allocates a few hundred
# bytes, not a whole read's size (for 256 KiB, an mmap and a munmap each time).
READ_SIZE = 256 * 1024
_READ_BUFFER = memoryview(bytearray(READ_SIZE))
_NOTHING_YET = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


async def open_connection(
    host: str, port: int, ssl_context: ssl.SSLContext | None, max_head_bytes: int
) -> HttpConnection:
    """Connect (and shake hands, with `ssl_context`) to the first of `host`'s addresses that
    answers; OSError or ssl.SSLError if none does. The caller bounds the time."""
    loop = asyncio.get_running_loop()
    try:  # an address needs no lookup, and no thread for it
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=_NUMERIC)
    except socket.gaierror:
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        try:
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = await _handshake(sock, ssl_context, host)
        except BaseException:
            sock.close()
            raise
        return HttpConnection(sock, max_head_bytes)
    raise error or OSError(f"no address for {host}")


_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


async def _handshake(sock: socket.socket, context: ssl.SSLContext, host: str) -> ssl.SSLSocket:
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await _ready(tls, write=False)
            except ssl.SSLWantWriteError:
                await _ready(tls, write=True)
    except BaseException:
        tls.close()
        raise


async def _ready(sock: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    watch, unwatch = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )
    watch(fd, _resolve, ready)
    try:
        await ready
    finally:
        unwatch(fd)


class HttpConnection:
    """Sends a request, reads the response head, then hands its body on as it comes."""

    def __init__(self, sock: socket.socket, max_head_bytes: int) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._max_head = max_head_bytes
        self._buffer = bytearray()  # the head so far
        self._head: asyncio.Future[bytes] = self._loop.create_future()
        self._held = b""  # body bytes read before the body was asked for
        self._eof: tuple[BaseException | None] | None = None  # (why) if it closed before then
        self._framing: Framing | None = None
        self.deliver: DataCallback | None = None  # where the body goes (body() sets it)
        self._body: asyncio.Future[None] | None = None
        self._unread: UnreadSlot | None = None  # where the body's socket counts as unread
        self._watching = False  # the socket's reader callback is on
        self._waiting = False  # for the consumer, which then reads on
        self._closed = False

    async def send(self, data: bytes) -> None:
        """Send all of `data`; ConnectionClosed if the connection fails."""
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except ssl.SSLWantReadError:  # TLS must read before it can send on
                await _ready(self.sock, write=False)
            except _NOTHING_YET:
                await _ready(self.sock, write=True)
            except OSError as exc:
                raise ConnectionClosed(exc) from None

    async def head(self) -> bytes:
        """The response head, up to and with its blank line (HeadTooLarge past the limit)."""
        self._watch()
        return await self._head

    async def body(
        self, framing: Framing, deliver: DataCallback, unread: UnreadSlot | None = None
    ) -> None:
        """Hand the body on until `framing` says it ended. ConnectionClosed if the connection
        cuts it short; what `deliver`, or what it returned, raised. `unread`: where the socket
        is told to the session's probe (ddump/cli/unread.py) until it closes."""
        self._framing, self.deliver = framing, deliver
        if unread is not None and not self._closed:
            self._unread = unread
            unread.watch(self._fd)
        self._body = self._loop.create_future()
        held, self._held = self._held, b""
        if framing.done:
            self._finish(None)
        elif held:
            self._feed(held)
        if self._eof is not None:
            self._lost(self._eof[0])
        elif not self._body.done() and not self._waiting:
            self._read()
        await self._body

    def close(self) -> None:
        """Close now; a body being read ends as if the peer had closed cleanly."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        if self._unread is not None:
            self._unread.forget()  # before the number can be another file's
        self.sock.close()
        if not self._head.done():
            self._head.set_exception(ConnectionClosed(None))
        if self._body is not None and not self._body.done():
            self._body.set_result(None)

    # Inside

    def _watch(self) -> None:
        if not self._watching and not self._closed:
            self._watching = True
            self._loop.add_reader(self._fd, self._read)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)

    def _read(self) -> None:
        """Read what the socket holds and hand it on; watch the socket once it holds nothing."""
        if not self._wants_data:
            return
        got, lost = 0, False
        error: BaseException | None = None
        while got < READ_SIZE:
            try:
                count = self.sock.recv_into(_READ_BUFFER[got:])
            except _NOTHING_YET:
                break
            except OSError as exc:  # ssl.SSLError too
                lost, error = True, exc
                break
            if count == 0:
                lost = True
                break
            got += count
            if not self._tls:  # a plain socket gives all it has at once
                break
        if got:
            self._received(bytes(_READ_BUFFER[:got]))
        if self._tls and self._unread is not None:  # a full read may leave some decrypted
            sock = self.sock
            assert isinstance(sock, ssl.SSLSocket)
            self._unread.buffered(got == READ_SIZE and sock.pending() > 0)
        if lost:
            self._lost(error)
        elif self._wants_data:
            self._watch()  # the next bytes wake us
            if got == READ_SIZE:  # the buffer was full: TLS may hold more than the socket
                self._loop.call_soon(self._read)

    @property
    def _wants_data(self) -> bool:
        """Reading now would hand bytes on (not: closed, the consumer not ready, or between
        the head and the body)."""
        if self._closed or self._waiting:
            return False
        return self._framing is not None or not self._head.done()

    def _received(self, data: bytes) -> None:
        if self._framing is not None:
            self._feed(data)
        elif not self._head.done():
            self._buffer += data
            end = find_head_end(self._buffer)
            if end is not None:
                head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end:])
                self._buffer = bytearray()
                self._held = rest
                self._unwatch()  # the body's reader starts reading
                self._head.set_result(head)
            elif len(self._buffer) > self._max_head:
                self._head.set_exception(HeadTooLarge())
        else:
            self._held += data
            self._unwatch()  # held until the body is asked for

    def _feed(self, data: bytes) -> None:
        assert self._framing is not None and self.deliver is not None
        if self._body is None or self._body.done():
            return
        failure: Exception | None = None
        try:
            payload = self._framing.feed(data)
        except ChunkedError as exc:  # the good bytes before the fault still count
            payload, failure = exc.payload, StreamFailure(str(exc))
        try:
            pending = self.deliver(payload) if payload else None
        except Exception as exc:
            self._finish(exc)
            return
        if failure is not None:
            self._finish(failure)
        elif self._framing.done:
            self._finish(None)
        elif pending is not None:
            self._waiting = True
            self._unwatch()
            asyncio.ensure_future(pending).add_done_callback(self._ready)

    def _ready(self, done: asyncio.Future[None]) -> None:
        self._waiting = False
        if self._body is None or self._body.done():
            return
        error = asyncio.CancelledError() if done.cancelled() else done.exception()
        if error is not None:
            self._finish(error)
            return
        self._read()  # most likely there is more: read it now, not after a loop pass

    def _lost(self, error: BaseException | None) -> None:
        self._unwatch()
        if not self._head.done():
            self._head.set_exception(ConnectionClosed(error))
            return
        if self._framing is None:  # told once the body is asked for
            self._eof = (error,)
            return
        try:
            self._framing.closed(error)
        except ConnectionClosed as exc:
            self._finish(exc)
        else:
            self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        assert self._body is not None
        if self._body.done():
            return
        if error is None:
            self._body.set_result(None)
        else:
            self._body.set_exception(error)
        self.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
