"""Captures whose body tcpdump writes itself (X-Ddump-Body: direct), worker and CLI sides.

The worker relays nothing: its head goes out at once, tcpdump's stdout is the client's socket,
the body ends when the connection closes, and GET /capture/stats tells a clean end from a
failed or refused one. A close alone must never pass for a clean end.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from ddump.pcap import PcapStreamParser
from tests.fake_worker import pcap_stream, read_request, sll2_packet
from tests.test_worker_app import (
    PCAP_HEADER_LEN,
    RECORD_LEN,
    Fake,
    ThreadWorker,
    fake_tcpdump,
    raw_request,
    stats_of,
    wait_for,
    wait_gone,
)

DIRECT = {"X-Ddump-Body": "direct"}
CLI = [sys.executable, "-m", "ddump.cli.main", "-w", "/dev/null"]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    yield from fake_tcpdump(monkeypatch)


def direct_get(worker: ThreadWorker, query: str) -> http.client.HTTPResponse:
    return worker.get(f"/capture?{query}", DIRECT)


def ended(worker: ThreadWorker, response: http.client.HTTPResponse) -> dict[str, Any]:
    """The worker's word on how the capture of `response` ended."""
    token = response.getheader("X-Ddump-Capture")
    assert token
    wait_for(lambda: len(worker.state.captures) == 0)
    status, stats = stats_of(worker, token)
    assert status == 200
    return stats


# ---- the worker ----


def test_tcpdump_writes_the_body_itself_and_the_worker_says_it_ended_cleanly(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = direct_get(worker, "count=3")
        assert response.status == 200
        assert response.getheader("X-Ddump-Body") == "direct"
        assert response.getheader("Transfer-Encoding") is None  # ended by the close
        body = response.read()
        assert len(body) == PCAP_HEADER_LEN + 3 * RECORD_LEN
        stats = ended(worker, response)
    assert stats["ended"] == "clean" and stats["captured"] == 3


@pytest.mark.parametrize(
    ("filter_", "status", "said"),
    [
        # The fake never says it listens: a relayed capture would answer nothing until the
        # start timeout; a direct one has its head at once and the refusal in its end.
        ("fake-silent", 503, "did not start listening"),
        ("fake-syntax-error", 400, "syntax error"),  # tcpdump's own words
    ],
)
def test_a_refused_start_is_an_empty_body_and_an_end_with_the_status_and_message(
    fake: Fake, filter_: str, status: int, said: str
) -> None:
    with ThreadWorker(fake.path, start_timeout_ns=10**9) as worker:
        response = direct_get(worker, f"filter={filter_}")
        assert response.status == 200 and response.getheader("X-Ddump-Capture")
        assert response.read() == b""
        stats = ended(worker, response)
    assert stats["ended"] == "refused" and stats["status"] == status
    assert said in stats["error"]


def test_tcpdump_dying_mid_stream_is_a_failed_end_not_a_clean_one(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = direct_get(worker, "filter=fake-crash")
        assert len(response.read()) == PCAP_HEADER_LEN  # the fake dies after the header
        stats = ended(worker, response)
    assert stats["ended"] == "failed" and "tcpdump ended with exit status" in stats["error"]


def test_a_direct_client_leaving_stops_tcpdump_within_a_second(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        client = raw_request(
            worker,
            b"GET /capture?filter=fake-idle HTTP/1.1\r\nHost: x\r\nX-Ddump-Body: direct\r\n\r\n",
        )
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        wait_for(lambda: len(fake.pids()) == 1)
        [pid] = fake.pids()
        client.close()
        assert wait_gone(pid, 3) < 1.0
        wait_for(lambda: len(worker.state.captures) == 0)


def test_a_batch_capture_is_still_relayed_in_chunks(fake: Fake) -> None:
    # A batch capture's stop is cut by the worker, record by record: it must read them.
    with ThreadWorker(fake.path) as worker:
        response = direct_get(worker, "batch=1&count=2")
        assert response.getheader("X-Ddump-Body") is None
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert len(response.read()) == PCAP_HEADER_LEN + 2 * RECORD_LEN


def test_identical_captures_after_a_direct_one_share_a_relayed_tcpdump(fake: Fake) -> None:
    # No one can join a tcpdump that writes to its client's socket: the next identical
    # captures share one relayed tcpdump, so three clients cost two tcpdumps, not three.
    with ThreadWorker(fake.path) as worker:
        first = direct_get(worker, "filter=fake-idle")
        second = direct_get(worker, "filter=fake-idle")
        third = direct_get(worker, "filter=fake-idle")
        assert first.getheader("X-Ddump-Body") == "direct"
        for relayed in (second, third):
            assert relayed.getheader("X-Ddump-Body") is None
            assert relayed.getheader("Transfer-Encoding") == "chunked"
        assert len(fake.pids()) == 2
        for response in (first, second, third):
            response.close()
        wait_for(lambda: len(worker.state.captures) == 0)
        again = direct_get(worker, "filter=fake-idle")  # alone again: direct again
        assert again.getheader("X-Ddump-Body") == "direct"
        again.close()


# ---- the CLI ----


class DirectServer:
    """A stand-in worker: a direct head, a pcap with one record, then the connection closes;
    GET /capture/stats answers `stats` (a JSON body) or, if None, a 404."""

    def __init__(self, stats: bytes | None) -> None:
        self.stats = stats
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stats_asked = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with client:
                request = read_request(client) or b""
                if request.startswith(b"GET /capture/stats"):
                    self.stats_asked += 1
                    client.sendall(self._stats_answer())
                else:
                    self.answer_capture(client)

    def answer_capture(self, client: socket.socket) -> None:
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.tcpdump.pcap\r\n"
            "X-Ddump-Capture: c1\r\nX-Ddump-Body: direct\r\nConnection: close\r\n\r\n"
        )
        packet = sll2_packet(b"\x45" + b"\x00" * 19)
        client.sendall(head.encode() + pcap_stream([(10**18, packet)]))
        threading.Event().wait(0.4)  # past the duration the CLI asked for

    def _stats_answer(self) -> bytes:
        if self.stats is None:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 8\r\n\r\nno such\n"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(self.stats)}\r\n\r\n".encode()
            + self.stats
        )

    def close(self) -> None:
        self.listener.close()


@contextmanager
def direct_server(stats: bytes | None) -> Iterator[DirectServer]:
    server = DirectServer(stats)
    try:
        yield server
    finally:
        server.close()


def run_cli(port: int) -> subprocess.CompletedProcess[str]:
    # The duration is the worker's to keep (in the URL): the end it makes is one asked for.
    url = f"http://127.0.0.1:{port}/capture?duration=0.2"
    return subprocess.run(
        [*CLI, url],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_cli_takes_a_direct_stream_that_the_worker_says_ended_cleanly() -> None:
    with direct_server(b'{"running": false, "ended": "clean", "error": "", "status": 200}') as s:
        out = run_cli(s.port)
    assert out.returncode == 0, out.stderr
    assert s.stats_asked >= 1
    assert "1 packets written" in out.stderr or "1 packet written" in out.stderr


def test_the_counts_told_at_a_direct_streams_end_are_not_asked_for_again() -> None:
    stats = b'{"running": false, "ended": "clean", "received": 7, "dropped_by_kernel": 0}'
    with direct_server(stats) as server:
        out = run_cli(server.port)
    assert out.returncode == 0, out.stderr
    assert server.stats_asked == 1  # once, when the stream ended; not again for the summary
    assert "0 dropped by the kernel" in out.stderr


@pytest.mark.parametrize(
    ("stats", "said"),
    [
        (None, "connection lost mid-stream (the worker did not say how the capture ended"),
        (
            b'{"running": false, "ended": "failed", "error": "tcpdump ended with signal 9"}',
            "the capture failed on the worker: tcpdump ended with signal 9",
        ),
        (b'{"running": true}', "the stream ended while the worker says the capture goes on"),
    ],
)
def test_a_direct_stream_that_closed_is_a_failure_unless_the_worker_says_clean(
    stats: bytes | None, said: str
) -> None:
    with direct_server(stats) as server:
        out = run_cli(server.port)
    assert out.returncode == 1
    assert said in out.stderr


def test_a_refused_direct_capture_reads_as_the_http_error_it_would_have_been() -> None:
    stats = b'{"ended": "refused", "status": 400, "error": "tcpdump rejected the filter: x"}'

    class Refusing(DirectServer):
        def answer_capture(self, client: socket.socket) -> None:
            # The head, then the close: tcpdump never wrote a byte.
            client.sendall(
                b"HTTP/1.1 200 OK\r\nX-Ddump-Capture: c1\r\nX-Ddump-Body: direct\r\n\r\n"
            )

    server = Refusing(stats)
    try:
        out = run_cli(server.port)
    finally:
        server.close()
    assert out.returncode == 1
    assert (
        "HTTP 400 Bad Request: the worker refused the request: tcpdump rejected the filter: x"
        in out.stderr
    )


def test_a_direct_capture_stopped_before_tcpdump_started_says_so() -> None:
    class Starting(DirectServer):
        def answer_capture(self, client: socket.socket) -> None:
            # The head, then nothing: tcpdump is still starting.
            client.sendall(
                b"HTTP/1.1 200 OK\r\nX-Ddump-Capture: c1\r\nX-Ddump-Body: direct\r\n\r\n"
            )
            client.recv(1)  # until the CLI leaves

    server = Starting(None)
    try:
        out = subprocess.run(
            [*CLI, "--duration", "0.3", f"http://127.0.0.1:{server.port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.close()
    assert out.returncode == 1
    assert "[failed: never started: the worker answered, but its tcpdump had not started" in (
        out.stderr
    )


def test_a_target_whose_tcpdump_starts_late_does_not_hold_back_the_others() -> None:
    """A direct head carries the worker's clock before tcpdump runs: nothing that target
    captures can be older than the head, so the other targets' packets go out after
    --max-delay, not after its start (or the start-up grace); its own come in order later."""
    sent: dict[str, float] = {}

    def starting_after(delay_s: float, name: str) -> type[DirectServer]:
        class Late(DirectServer):
            def answer_capture(self, client: socket.socket) -> None:
                client.sendall(
                    b"HTTP/1.1 200 OK\r\nX-Ddump-Capture: c1\r\nX-Ddump-Body: direct\r\n"
                    + f"X-Ddump-Clock: {time.time_ns()}\r\n\r\n".encode()
                )
                threading.Event().wait(delay_s)  # tcpdump starting
                sent[name] = time.monotonic()
                packet = sll2_packet(b"\x45" + name.encode() * 19)
                client.sendall(pcap_stream([(time.time_ns(), packet)]))
                client.recv(1)  # until the CLI leaves

        return Late

    prompt, slow = starting_after(0.0, "a")(None), starting_after(2.5, "b")(None)
    try:
        cli = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", "-w", "-", "--max-delay", "50ms",
             "--duration", "3.5", f"http://127.0.0.1:{prompt.port}",
             f"http://127.0.0.1:{slow.port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        )  # fmt: skip
        assert cli.stdout is not None
        first = cli.stdout.read(1)
        first_at = time.monotonic()
        rest, stderr = cli.communicate(timeout=30)
    finally:
        prompt.close()
        slow.close()
    assert cli.returncode == 0, stderr.decode()
    assert first
    assert first_at - sent["a"] < 0.6  # was 1 s and more: the start-up grace
    assert first_at < sent["b"]
    parser = PcapStreamParser()
    payloads = [data[-19:] for _, data in parser.feed(first + rest)]
    assert payloads == [b"a" * 19, b"b" * 19]
