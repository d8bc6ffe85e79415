"""Identical live captures share one tcpdump (ddump/worker/taps.py).

First the stream plumbing with a scripted capture (no process): a client that joins at any
point gets the pcap header and then whole records only. Then the worker with the fake tcpdump
of test_worker_app: who shares, who does not, and what each client sees and counts.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import logging
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from ddump.pcap import PcapStreamParser
from ddump.worker.registry import CaptureRegistry
from ddump.worker.taps import TAP_DRAIN_S, TAP_STALL_S, SharedCapture, Tap
from ddump.worker.tcpdump import RecordCounter, TcpdumpStats
from tests.test_worker_app import (
    PCAP_HEADER_LEN,
    RECORD_LEN,
    Fake,
    ThreadWorker,
    fake_global_header,
    fake_tcpdump,
    wait_for,
    wait_gone,
)
from tests.test_worker_app import fake as _fake_fixture  # noqa: F401 (the `fake` fixture)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    yield from fake_tcpdump(monkeypatch)


GLOBAL = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 276)


def record(n: int, size: int) -> bytes:
    payload = n.to_bytes(4, "big") * (size // 4)
    return struct.pack("<IIII", n, 0, len(payload), len(payload)) + payload


class ScriptedCapture:
    """What SharedCapture needs of a Capture: reads come from a list of chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.counter = RecordCounter()
        self.listening = False
        self.running = True
        self.stop_reason: str | None = None
        self.pid = 1
        self.stdout_fd: int | None = None  # a pipe the worker reads, not the client's socket
        self.returncode: int | None = None
        self.stderr_text = ""
        self.stats = TcpdumpStats()
        self.allowed = 0  # chunks the test let through so far
        self.served = 0  # reads answered so far (the last one b"")
        self._more = asyncio.Event()

    def allow(self) -> None:
        self.allowed += 1
        self._more.set()

    async def start(self, timeout_ns: int) -> None:
        self.listening = True

    async def read(self) -> bytes:
        while self.served >= self.allowed:
            self._more.clear()
            await self._more.wait()
        self.served += 1
        if not self.chunks:
            return b""
        data = self.chunks.pop(0)
        self.counter.feed(data)
        return data

    async def current_stats(self, timeout_ns: int) -> TcpdumpStats:
        return self.stats

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def abort(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    async def wait(self, timeout_ns: int = 0) -> int | None:
        return self.returncode


async def drain(tap: Tap) -> bytes:
    data = b""
    while chunk := await tap.read():
        data += chunk
    return data


@pytest.mark.parametrize("join_after", range(1, 12))
def test_a_client_joining_at_any_point_gets_the_header_then_whole_records(
    join_after: int,
) -> None:
    stream = GLOBAL + b"".join(record(n, 4 + 8 * n) for n in range(8))
    # Cut the stream everywhere awkward: inside the global header, a record header, a body.
    cuts = [0, 10, 30, 35, 60, 61, 90, 150, 200, 260, 330, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(cuts)]

    async def run() -> tuple[bytes, bytes]:
        capture = ScriptedCapture(list(chunks))
        shared = SharedCapture(capture, lambda _: None)  # type: ignore[arg-type]
        first = shared.join()
        await first.start(10**9)
        reading_first = asyncio.ensure_future(drain(first))
        late: Tap | None = None
        for index in range(len(chunks) + 1):
            if index == join_after:
                late = shared.join()
                reading_late = asyncio.ensure_future(drain(late))
            capture.allow()
            while capture.served <= index:  # the chunk was read and handed out
                await asyncio.sleep(0.001)
        assert late is not None
        return await reading_first, await reading_late

    everything, joined = asyncio.run(asyncio.wait_for(run(), 10))
    assert everything == stream
    assert joined[:PCAP_HEADER_LEN] == GLOBAL
    parser = PcapStreamParser()
    tail = [data for _, data in parser.feed(joined)]
    parser.close()  # raises on a cut record
    assert tail == [record(n, 4 + 8 * n) for n in range(8 - len(tail), 8)]
    assert b"".join(tail) == stream[len(stream) - len(b"".join(tail)) :]


def test_a_client_stopping_while_others_go_on_ends_after_a_whole_record() -> None:
    stream = GLOBAL + b"".join(record(n, 100) for n in range(4))
    cut = len(GLOBAL) + 116 + 50  # the first read ends inside the second record's body

    async def run() -> bytes:
        capture = ScriptedCapture([stream[:cut], stream[cut:]])
        shared = SharedCapture(capture, lambda _: None)  # type: ignore[arg-type]
        staying, stopping = shared.join(), shared.join()
        await staying.start(10**9)
        other = asyncio.ensure_future(drain(staying))
        reading = asyncio.ensure_future(drain(stopping))
        capture.allow()
        while capture.served < 1:
            await asyncio.sleep(0.001)
        stopping.stop("duration reached")
        await asyncio.sleep(TAP_DRAIN_S + 0.15)  # the rest of that record comes late
        capture.allow()
        body = await asyncio.wait_for(reading, 2)
        capture.allow()
        await asyncio.wait_for(other, 2)
        return body

    body = asyncio.run(asyncio.wait_for(run(), 10))
    parser = PcapStreamParser()
    got = [data for _, data in parser.feed(body)]
    parser.close()  # raises on a cut record
    assert got == [record(0, 100), record(1, 100)]


def test_a_tcpdump_that_exited_by_itself_is_not_joined() -> None:
    async def run() -> None:
        registry = CaptureRegistry(8)
        first = ScriptedCapture([GLOBAL])
        _, tap = registry.open(("argv",), lambda: first)  # type: ignore[arg-type, return-value]
        await tap.start(10**9)
        first.returncode = 1  # its pipe not read to the end yet
        second = ScriptedCapture([GLOBAL])
        _, other = registry.open(("argv",), lambda: second)  # type: ignore[arg-type, return-value]
        assert other.capture is second

    asyncio.run(asyncio.wait_for(run(), 10))


# ---- the worker, with the fake tcpdump ----


def read_records(response: http.client.HTTPResponse, count: int) -> list[bytes]:
    records = []
    for _ in range(count):
        records.append(response.read(RECORD_LEN))
    return records


def test_identical_captures_share_one_tcpdump_and_each_gets_a_whole_pcap(
    fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ddump.worker")
    with ThreadWorker(fake.path) as worker:
        first = worker.get("/capture?filter=udp")
        assert first.read(PCAP_HEADER_LEN) == fake_global_header()
        read_records(first, 3)  # the fake is writing a record every 20 ms
        second = worker.get("/capture?filter=udp")
        assert second.status == 200
        assert second.read(PCAP_HEADER_LEN) == fake_global_header()
        assert set(read_records(second, 5)) == {read_records(first, 1)[0]}
        [pid] = fake.pids()
        assert first.getheader("X-Ddump-Capture") != second.getheader("X-Ddump-Capture")
        first.close()
        time.sleep(0.3)
        assert len(read_records(second, 5)) == 5  # tcpdump goes on for the other client
        assert not list(fake.log.glob("*.term"))
        second.close()
        wait_gone(pid, 2)  # the last client gone: tcpdump is stopped
    starts = [r.getMessage() for r in caplog.records if " start:" in r.getMessage()]
    assert [s.endswith("(shared)") for s in starts] == [False, True]


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("filter=udp", "filter=tcp"),
        ("filter=udp", "filter=udp&snaplen=200"),
        ("filter=udp&count=50", "filter=udp&count=50"),  # tcpdump ends itself: its own
        ("filter=udp&batch=1", "filter=udp&batch=1"),  # a batch stop hands over: its own
    ],
)
def test_a_capture_that_differs_or_is_its_own_gets_its_own_tcpdump(
    fake: Fake, one: str, other: str
) -> None:
    with ThreadWorker(fake.path) as worker:
        first = worker.get(f"/capture?{one}")
        second = worker.get(f"/capture?{other}")
        assert first.status == second.status == 200
        assert len(fake.pids()) == 2


def test_no_shared_captures_gives_every_client_its_own_tcpdump(fake: Fake) -> None:
    with ThreadWorker(fake.path, share=False) as worker:
        first = worker.get("/capture?filter=udp")
        second = worker.get("/capture?filter=udp")
        assert first.status == second.status == 200
        assert len(fake.pids()) == 2


def test_a_shared_clients_duration_ends_its_stream_cleanly_and_the_other_goes_on(
    fake: Fake,
) -> None:
    with ThreadWorker(fake.path) as worker:
        first = worker.get("/capture?filter=udp")
        read_records(first, 2)
        second = worker.get("/capture?filter=udp&duration=0.3")
        body = second.read()  # ends with the terminating chunk, or IncompleteRead
        assert body.startswith(fake_global_header())
        assert (len(body) - PCAP_HEADER_LEN) % RECORD_LEN == 0
        assert len(read_records(first, 5)) == 5
        assert not list(fake.log.glob("*.term"))


def stats_of(worker: ThreadWorker, token: str | None) -> dict[str, int]:
    response = worker.get(f"/capture/stats?id={token}")
    assert response.status == 200
    result: dict[str, int] = json.loads(response.read())
    return result


def test_a_later_client_counts_only_what_was_captured_since_it_joined(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        first = worker.get("/capture?filter=udp")
        first.read(PCAP_HEADER_LEN)
        read_records(first, 10)  # the fake counts a packet per record it writes
        second = worker.get("/capture?filter=udp")
        second.read(PCAP_HEADER_LEN)
        read_records(second, 3)
        early = stats_of(worker, first.getheader("X-Ddump-Capture"))
        late = stats_of(worker, second.getheader("X-Ddump-Capture"))
    assert early["captured"] >= 13
    assert 3 <= late["captured"] <= early["captured"] - 8
    # The fake reports one kernel drop on every request: both saw the same one.
    assert late["dropped_by_kernel"] == 0 and early["dropped_by_kernel"] == 1


def test_a_client_that_stops_reading_is_cut_off_so_the_others_go_on(
    fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ddump.worker")
    with ThreadWorker(fake.path) as worker:
        stalled = socket.create_connection(("127.0.0.1", worker.port), timeout=10)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /capture?filter=fake-flood HTTP/1.1\r\nHost: w\r\n\r\n")
        time.sleep(0.5)  # it reads nothing: every buffer up to it fills
        other = worker.get("/capture?filter=fake-flood")
        started = time.monotonic()
        got = len(other.read(4 << 20))  # flows again once the stalled client is cut off
        waited = time.monotonic() - started
        assert got == 4 << 20 and len(fake.pids()) == 1
        assert TAP_STALL_S - 0.5 < waited < TAP_STALL_S + 5

        def ends() -> list[str]:
            return [r.getMessage() for r in caplog.records if " end:" in r.getMessage()]

        wait_for(lambda: len(ends()) == 1)  # its response is over, the other goes on
        assert "reason=client stalled" in ends()[0]
        other.close()
        stalled.close()
