"""The CLI's HTTP/1.1 response reading: the head, the body's framing, and reading a socket
from the event loop with backpressure (ddump/cli/http_wire.py, ddump/cli/http_conn.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from pathlib import Path

import pytest

from ddump.cli.http_conn import READ_SIZE, HttpConnection, open_connection
from ddump.cli.http_wire import (
    ConnectionClosed,
    HeadTooLarge,
    body_framing,
    find_head_end,
    parse_head,
)
from ddump.cli.sources import StreamFailure
from ddump.cli.unread import UnreadProbe
from tests.certs import make_pki
from tests.fake_worker import read_request

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.tcpdump.pcap\r\n\r\n"


def test_a_head_gives_status_reason_and_headers_by_lower_case_name() -> None:
    head = parse_head(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nX-A: 1\r\nx-a: 2\r\n"
        b"X-Long: one\r\n two\r\n\r\n"
    )
    assert (head.code, head.reason) == (503, "Service Unavailable")
    assert head.get("retry-after") == "2"
    assert head.get("X-A") == "1, 2"  # repeats joined, as RFC 9110 allows
    assert head.get("X-Long") == "one two"  # an obsolete folded line
    assert head.get("Missing", "none") == "none"


def test_a_status_line_without_a_reason_is_taken() -> None:
    assert parse_head(b"HTTP/1.0 200\n\n").code == 200


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP response: 'SSH-2.0-OpenSSH_9.2'"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "malformed response header"),
    ],
)
def test_what_is_not_an_http_head_says_so(raw: bytes, said: str) -> None:
    with pytest.raises(StreamFailure, match=said):
        parse_head(raw)


def test_the_head_ends_at_its_blank_line_with_or_without_cr() -> None:
    assert find_head_end(b"HTTP/1.1 200 OK\r\n\r\nbody") == 19
    assert find_head_end(b"HTTP/1.1 200 OK\n\nbody") == 17
    assert find_head_end(b"HTTP/1.1 200 OK\r\nX: y\r\n") is None


def test_a_length_body_ends_at_its_length_and_a_chunked_one_at_its_last_chunk() -> None:
    length = body_framing(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"))
    assert length.feed(b"abc") == b"abc" and not length.done
    assert length.feed(b"defgh") == b"de" and length.done
    chunked = body_framing(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))
    assert chunked.feed(b"3\r\nabc\r\n0\r\n\r\n") == b"abc" and chunked.done
    with pytest.raises(StreamFailure, match="malformed Content-Length"):
        body_framing(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"))


def test_a_body_until_the_close_is_cut_by_a_reset_only_when_strict() -> None:
    head = parse_head(HEAD)
    body_framing(head).closed(ConnectionResetError())  # a plain response: the close ends it
    body_framing(head, until_close_only=True).closed(None)  # a clean close ends it
    with pytest.raises(ConnectionClosed):
        body_framing(head, until_close_only=True).closed(ConnectionResetError())


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets on loopback, ours non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    ours.setblocking(False)
    return ours, theirs


async def _read(
    peer_sends: list[bytes],
    *,
    slow_consumer_s: float = 0.0,
    reset: bool = False,
    until_close_only: bool = False,
) -> tuple[list[bytes], BaseException | None]:
    """Read a response the peer sends in `peer_sends` pieces, then closes (or resets)."""
    ours, theirs = tcp_pair()
    conn = HttpConnection(ours, 64 * 1024)
    got: list[bytes] = []
    busy = 0

    def deliver(data: bytes) -> asyncio.Future[None] | None:
        nonlocal busy
        assert busy == 0, "handed on while the consumer was not ready"
        got.append(data)
        if not slow_consumer_s:
            return None
        busy += 1
        ready = asyncio.get_running_loop().create_future()

        def done() -> None:
            nonlocal busy
            busy -= 1
            ready.set_result(None)

        asyncio.get_running_loop().call_later(slow_consumer_s, done)
        return ready

    theirs.setblocking(False)

    async def peer() -> None:
        for piece in peer_sends:
            await asyncio.get_running_loop().sock_sendall(theirs, piece)
            await asyncio.sleep(0.01)
        if reset:
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()

    sending = asyncio.ensure_future(peer())
    error: BaseException | None = None
    try:
        head = parse_head(await conn.head())
        await conn.body(body_framing(head, until_close_only=until_close_only), deliver)
    except ConnectionClosed as exc:
        error = exc
    finally:
        conn.close()
        await sending
    return got, error


def test_a_body_comes_whole_and_in_order_whatever_the_pieces() -> None:
    pieces = [HEAD[:10], HEAD[10:] + b"one", b"two", b"three"]
    got, error = asyncio.run(_read(pieces))
    assert error is None
    assert b"".join(got) == b"onetwothree"


def test_nothing_is_handed_on_while_the_consumer_is_not_ready_and_nothing_is_lost() -> None:
    pieces = [HEAD] + [bytes([65 + i]) * 100 for i in range(20)]
    got, error = asyncio.run(_read(pieces, slow_consumer_s=0.03))
    assert error is None
    assert b"".join(got) == b"".join(pieces[1:])
    assert len(got) < 20  # what came while it was busy waited, and was read in one go


def test_a_large_body_is_read_in_pieces_no_larger_than_the_buffer() -> None:
    body = bytes(range(256)) * (3 * READ_SIZE // 256)
    got, error = asyncio.run(_read([HEAD, body]))
    assert error is None
    assert b"".join(got) == body
    assert max(map(len, got)) <= READ_SIZE


def test_a_reset_cuts_a_strict_body_and_says_so() -> None:
    got, error = asyncio.run(_read([HEAD + b"part"], reset=True, until_close_only=True))
    assert b"".join(got) == b"part"  # what came before the reset is kept
    assert isinstance(error, ConnectionClosed)
    assert isinstance(error.error, ConnectionResetError)


def test_a_chunked_body_cut_short_is_a_lost_connection_with_its_good_bytes_kept() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    got, error = asyncio.run(_read([chunked + b"3\r\nabc\r\n10\r\nxy"]))
    assert b"".join(got) == b"abcxy"
    assert isinstance(error, ConnectionClosed)


def test_a_close_before_the_head_ends_is_a_lost_connection() -> None:
    got, error = asyncio.run(_read([b"HTTP/1.1 200 OK\r\n"]))
    assert got == []
    assert isinstance(error, ConnectionClosed)


def test_closing_while_the_head_is_awaited_ends_the_wait() -> None:
    async def main() -> None:
        ours, theirs = tcp_pair()
        conn = HttpConnection(ours, 64 * 1024)
        asyncio.get_running_loop().call_later(0.05, conn.close)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(conn.head(), 5)
        theirs.close()

    asyncio.run(main())


def serve_once(server: socket.socket, answer: bytes, tls: ssl.SSLContext | None = None) -> None:
    """In a thread: accept one connection, read the request, send `answer`, close."""

    def run() -> None:
        client, _ = server.accept()
        if tls is not None:
            client = tls.wrap_socket(client, server_side=True)
        with client:
            read_request(client)
            client.sendall(answer)
            if isinstance(client, ssl.SSLSocket):
                # close_notify, the body's clean end; the client closes without answering it
                with contextlib.suppress(OSError):
                    client.unwrap()

    threading.Thread(target=run, daemon=True).start()


def test_a_tls_body_larger_than_a_read_comes_whole_to_a_slow_consumer(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(pki.server.cert, pki.server.key)
    client_tls = ssl.create_default_context(cafile=str(pki.ca))
    body = bytes(range(256)) * (5 * READ_SIZE // 256)  # many TLS records, several reads
    listener = socket.create_server(("127.0.0.1", 0))
    serve_once(listener, HEAD + body, server_tls)

    async def main() -> list[bytes]:
        port = listener.getsockname()[1]
        conn = await open_connection("localhost", port, client_tls, 64 * 1024)
        got: list[bytes] = []

        def deliver(data: bytes) -> asyncio.Future[None]:
            got.append(data)
            ready = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.002, ready.set_result, None)
            return ready

        try:
            await conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = parse_head(await asyncio.wait_for(conn.head(), 10))
            await asyncio.wait_for(conn.body(body_framing(head), deliver), 30)
        finally:
            conn.close()
        return got

    got = asyncio.run(main())
    listener.close()
    assert b"".join(got) == body


def test_a_name_is_looked_up_and_every_address_tried(tmp_path: Path) -> None:
    """localhost may be ::1 first; a server on 127.0.0.1 only is still reached."""
    listener = socket.create_server(("127.0.0.1", 0))
    serve_once(listener, HEAD + b"hello")

    async def main() -> bytes:
        conn = await open_connection("localhost", listener.getsockname()[1], None, 64 * 1024)
        got: list[bytes] = []
        try:
            await conn.send(b"GET / HTTP/1.1\r\n\r\n")
            head = parse_head(await asyncio.wait_for(conn.head(), 10))
            await asyncio.wait_for(conn.body(body_framing(head), got.append), 10)
        finally:
            conn.close()
        return b"".join(got)

    assert asyncio.run(main()) == b"hello"
    listener.close()


def test_no_one_listening_is_the_systems_refusal() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(open_connection("127.0.0.1", port, None, 64 * 1024))


def test_a_head_that_never_ends_is_refused_past_the_limit() -> None:
    async def main() -> None:
        ours, theirs = tcp_pair()
        conn = HttpConnection(ours, 64 * 1024)
        theirs.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"x" * 70_000)
        try:
            with pytest.raises(HeadTooLarge):
                await asyncio.wait_for(conn.head(), 10)
        finally:
            conn.close()
            theirs.close()

    asyncio.run(main())


def test_a_body_socket_counts_as_unread_while_bytes_wait_and_is_forgotten_at_close() -> None:
    async def main() -> tuple[list[int], list[int], list[int], list[int]]:
        ours, theirs = tcp_pair()
        conn = HttpConnection(ours, 64 * 1024)
        probe = UnreadProbe()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        theirs.sendall(HEAD + b"first")
        head = parse_head(await conn.head())
        got: list[bytes] = []

        def deliver(data: bytes) -> asyncio.Future[None]:
            got.append(data)
            return ready  # busy until the test says

        body = asyncio.ensure_future(conn.body(body_framing(head), deliver, probe.slot(7)))
        while not got:
            await asyncio.sleep(0.01)
        quiet = probe.streams()
        theirs.sendall(b"second")  # comes while the consumer is busy: waits in the socket
        await asyncio.sleep(0.05)
        waiting = probe.streams()
        ready.set_result(None)
        await asyncio.sleep(0.05)
        read = probe.streams()
        theirs.sendall(b"third")
        conn.close()  # forgotten before it is closed: the number may be another file's
        await body
        theirs.close()
        closed = probe.streams()
        probe.close()
        assert b"".join(got) == b"firstsecond"
        return quiet, waiting, read, closed

    quiet, waiting, read, closed = asyncio.run(main())
    assert (quiet, waiting, read, closed) == ([], [7], [], [])
