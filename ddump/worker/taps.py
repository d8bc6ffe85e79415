"""Identical live captures share one tcpdump: its pcap is read once and handed to each client.

Two clients asking a worker for the same capture (same filter, same options) would otherwise run
two tcpdumps doing the same work: the kernel copies every packet into both rings, both wake per
packet, and each start allocates a ring (64 captures starting at once take 0.3 s on two cores
with warm memory, seconds without: see BENCHMARKS.md, Fan-in). So a request that matches a
running shareable capture (immediate mode, no packet count) joins it: a `Tap` is one client's
view, with its own name, counts and end; a `SharedCapture` is the tcpdump and the task that
reads its pipe for all of them.

A joining client gets the pcap global header, then the stream from the next record on. Clients
of one tcpdump share its pace: the pipe is read only when every client has taken what it was
given, so a slow one makes tcpdump wait and the kernel drop (and count) packets for all. But a
client that takes nothing for TAP_STALL_S while it holds others back is cut off (its stream
ends without the chunked terminator, so it knows): one stalled reader must not stop the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from tornado.ioloop import IOLoop

from ddump.pcap import GLOBAL_HEADER_LEN
from ddump.worker.capture import READ_SIZE, Capture, background
from ddump.worker.params import NS_PER_S
from ddump.worker.tcpdump import RecordCounter, TcpdumpStats

log = logging.getLogger("ddump.worker")

TAP_BACKLOG = READ_SIZE  # the pipe is read again once every client holds less than this
COALESCE_BELOW = 16 * 1024  # bytes: a smaller read means the pipe was nearly empty
COALESCE_S = 0.001
# A client that stops while others go on gets what was captured until then: in immediate mode
# a packet is in the pipe within milliseconds of its capture.
TAP_DRAIN_S = 0.25
STATS_TIMEOUT_NS = NS_PER_S  # for tcpdump's counts when a client joins or leaves
TAP_STALL_S = 2.0  # a client holding the others back this long is cut off


class SharedCapture:
    """One tcpdump and the clients reading it."""

    def __init__(self, capture: Capture, on_idle: Callable[[SharedCapture], None]) -> None:
        self.capture = capture
        self.taps: list[Tap] = []
        self.header = b""  # the stream's first bytes, up to its global header
        self.offset = 0  # bytes read from tcpdump so far
        self._on_idle = on_idle  # told when the last client left
        self._starting: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._room = asyncio.Event()  # a client took its data, joined or left
        self._stopping = False

    @property
    def over(self) -> bool:
        """tcpdump's output ended (or it never started): nobody gets more."""
        starting = self._starting
        failed = (
            starting is not None
            and starting.done()
            and (starting.cancelled() or starting.exception() is not None)
        )
        return failed or (self._pump is not None and self._pump.done())

    @property
    def joinable(self) -> bool:
        """A new client may still join: the capture is not stopping, failed or ended."""
        capture = self.capture
        exited = capture.returncode is not None  # by itself: its pipe may not be drained yet
        return not (self._stopping or self.over or capture.stop_reason or exited)

    def join(self) -> Tap:
        """A new client: from the next whole record on (everything, if nothing was read yet)."""
        tap = Tap(self, self._join_point())
        self.taps.append(tap)
        self._room.set()
        return tap

    def _join_point(self) -> tuple[int, bytes]:
        # (stream offset where the client's data begins, what it gets before that)
        if self.offset < GLOBAL_HEADER_LEN:
            return self.offset, self.header
        next_record, begun = self.capture.counter.next_record()
        if next_record >= self.offset:
            return next_record, self.header
        return self.offset, self.header + begun  # a record header cut by the end of a read

    async def start(self, timeout_ns: int) -> None:
        """Start tcpdump, once for all clients; raises CaptureRefused for each if it fails."""
        if self._starting is None:
            self._starting = background(self._start(timeout_ns), f"capture-start-{id(self)}")
        await asyncio.shield(self._starting)

    async def _start(self, timeout_ns: int) -> None:
        await self.capture.start(timeout_ns)
        if self.capture.stdout_fd is None:  # else tcpdump writes to the client itself
            self._pump = background(self._read_pipe(), f"tcpdump-pipe-{self.capture.pid}")

    async def _read_pipe(self) -> None:
        capture = self.capture
        try:
            while True:
                await self._wait_for_room()
                data = await capture.read()
                if not data:
                    break
                first = self.offset
                self.offset += len(data)
                if first < GLOBAL_HEADER_LEN:
                    self.header += data[: GLOBAL_HEADER_LEN - first]
                for tap in self.taps:
                    tap.put(data, first)
                if len(data) < COALESCE_BELOW:
                    # A quiet pipe gives one packet per read: one HTTP chunk, one send and one
                    # wakeup of each client. Pausing before the next read lets a few packets
                    # gather in the pipe (at most COALESCE_S of latency).
                    await asyncio.sleep(COALESCE_S)
        except Exception:
            log.exception("reading tcpdump's output (pid %s) failed", capture.pid)
            capture.abort("worker error")
        finally:
            for tap in self.taps:
                tap.end()

    async def _wait_for_room(self) -> None:
        loop = asyncio.get_running_loop()
        while full := [tap for tap in self.taps if tap.backlog >= TAP_BACKLOG]:
            stalled = [tap for tap in full if loop.time() - tap.full_since > TAP_STALL_S]
            if stalled and len(full) < len(self.taps):  # and some client is held back by them
                for tap in stalled:
                    log.warning(
                        "a client of tcpdump %s took nothing for %.0f s while others waited: "
                        "cut off",
                        self.capture.pid,
                        TAP_STALL_S,
                    )
                    tap.cut_off()
                continue
            self._room.clear()
            stalled_since = min(tap.full_since for tap in full)
            wait = max(0.01, stalled_since + TAP_STALL_S - loop.time() + 0.01)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), wait)

    def live_taps(self, but: Tap) -> bool:
        """Some client other than `but` still reads and is not stopping."""
        return any(t is not but and t.stop_reason is None for t in self.taps)

    def leave(self, tap: Tap, reason: str) -> None:
        if tap in self.taps:
            self.taps.remove(tap)
            self._room.set()
        if not self.taps:
            self.capture.abort(reason)
            self._on_idle(self)
        elif not any(t.stop_reason is None for t in self.taps):
            self.stop(reason)

    def stop(self, reason: str) -> None:
        """Stop tcpdump: every client's stream ends with what it wrote."""
        self._stopping = True
        for tap in self.taps:
            tap.stop_reason = tap.stop_reason or reason
        self.capture.stop(reason)

    def abort(self, reason: str) -> None:
        self._stopping = True
        for tap in list(self.taps):
            tap.abort(reason)
        self.capture.abort(reason)


class Tap:
    """One client's view of a (possibly shared) capture."""

    def __init__(self, shared: SharedCapture, join_point: tuple[int, bytes]) -> None:
        self.shared = shared
        self.capture = shared.capture
        self.joined = shared.capture.listening  # a tcpdump already running for another client
        # Names this capture in GET /capture/stats?id=...: unguessable, so a client can only
        # ask about its own captures.
        self.token = secrets.token_urlsafe(12)
        self.counter = RecordCounter()  # what this client was given
        self.relayed = 0  # bytes passed on to the client
        self.stop_reason: str | None = None
        self._start, first = join_point
        self._chunks: list[bytes] = []
        self.backlog = 0
        self.full_since = 0.0  # loop time the backlog reached TAP_BACKLOG
        self.on_cut_off: Callable[[], None] | None = None  # ends the client's response
        self._wake = asyncio.Event()
        self._ended = False
        self._drain_timer: object | None = None
        self._final: TcpdumpStats | None = None  # this client's counts once it stopped
        self._final_task: asyncio.Task[None] | None = None
        self._baseline: asyncio.Task[TcpdumpStats] | None = None
        if self.joined:  # tcpdump's counts so far are not this client's
            self._baseline = background(
                self.capture.current_stats(STATS_TIMEOUT_NS), f"capture-baseline-{self.token}"
            )
        if first:
            self._take(first)

    @property
    def pid(self) -> int | None:
        return self.capture.pid

    @property
    def listening(self) -> bool:
        return self.capture.listening

    @property
    def running(self) -> bool:
        return not self._ended and self.capture.running

    @property
    def returncode(self) -> int | None:
        return self.capture.returncode

    @property
    def stderr_text(self) -> str:
        return self.capture.stderr_text

    async def start(self, timeout_ns: int) -> None:
        """Return once tcpdump listens (at once if it already does); raise CaptureRefused."""
        await self.shared.start(timeout_ns)

    def put(self, data: bytes, first: int) -> None:
        """The next bytes read from tcpdump, `first` being the stream offset of data[0]."""
        if self._ended:
            return
        skip = self._start - first
        if skip >= len(data):
            return
        if skip > 0:
            data = data[skip:]
        self._start = 0
        self._take(data)

    def _take(self, data: bytes) -> None:
        passed = self.counter.feed(data)
        if passed:
            self._chunks.append(passed)
            if self.backlog < TAP_BACKLOG <= self.backlog + len(passed):
                self.full_since = asyncio.get_running_loop().time()
            self.backlog += len(passed)
            self._wake.set()
        if self.counter.cut:  # past this client's stop: its stream ends here
            self.end()

    def end(self) -> None:
        """No more data for this client (what it was given can still be read)."""
        self._ended = True
        self._wake.set()
        if self._drain_timer is not None:
            IOLoop.current().remove_timeout(self._drain_timer)
            self._drain_timer = None

    async def read(self) -> bytes:
        """What tcpdump wrote for this client since the last read; b"" at its end."""
        while not self._chunks and not self._ended:
            self._wake.clear()
            await self._wake.wait()
        if not self._chunks:
            return b""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self.backlog = 0
        self.relayed += len(data)
        self.shared._room.set()
        return data

    def cut_off(self) -> None:
        """This client stalls the others: end its response as a failure."""
        self.stop_reason = self.stop_reason or "client stalled"
        self.end()
        self._chunks.clear()
        self.backlog = 0
        if self.on_cut_off is not None:
            self.on_cut_off()
        self.shared.leave(self, "client stalled")

    def stop(self, reason: str) -> None:
        """End this client's stream after what was captured until now."""
        if self.stop_reason is not None or self._ended:
            return
        if not self.shared.live_taps(but=self):
            self.shared.stop(reason)  # the last client: tcpdump stops as it would alone
            return
        self.stop_reason = reason
        self.counter.cutoff_ns = time.time_ns()
        self._drain_timer = IOLoop.current().call_later(TAP_DRAIN_S, self._drained)
        self._final_task = background(self._counts_now(), f"capture-stop-counts-{self.token}")

    def _drained(self) -> None:
        self._drain_timer = None
        if self.counter.between_records():
            self.end()
        else:  # a record's body is still to come: end before the next one
            self.counter.cutoff_ns = -1

    async def _counts_now(self) -> None:
        self._final = await self.current_stats(STATS_TIMEOUT_NS)

    def abort(self, reason: str) -> None:
        """Nobody reads this client's stream any more."""
        if not self._ended:  # else it ended by itself (tcpdump exited): no reason to give
            self.stop_reason = self.stop_reason or reason
        self.end()
        self.shared.leave(self, reason)

    async def wait(self, timeout_ns: int = 5 * NS_PER_S) -> int | None:
        """Once this client left: tcpdump's exit status if it stopped (bounded wait), else None.

        A client leaving a tcpdump that goes on for others takes its counts until now.
        """
        others = any(t is not self for t in self.shared.taps)
        if self._final_task is not None:  # its counts were asked for when it stopped
            await asyncio.wait({self._final_task}, timeout=timeout_ns / NS_PER_S)
        if others and not self.shared.over and self.capture.running:
            if self._final is None:
                self._final = await self.current_stats(STATS_TIMEOUT_NS)
            return None
        return await self.capture.wait(timeout_ns)

    @property
    def stats(self) -> TcpdumpStats:
        """tcpdump's latest counts for this client (since it joined)."""
        if self._final is not None:
            return self._final
        return self._since_joined(self.capture.stats)

    async def current_stats(self, timeout_ns: int) -> TcpdumpStats:
        """tcpdump's counts now for this client (see Capture.current_stats)."""
        if self._final is not None:
            return self._final
        stats = await self.capture.current_stats(timeout_ns)
        if self._baseline is not None:
            await asyncio.wait({self._baseline}, timeout=timeout_ns / NS_PER_S)
        return self._since_joined(stats)

    def _since_joined(self, stats: TcpdumpStats) -> TcpdumpStats:
        if self._baseline is None:
            return stats
        if not self._baseline.done() or self._baseline.exception() is not None:
            return TcpdumpStats()  # not known
        return stats.since(self._baseline.result())
